"""``milepost status RUN_DIR``: a readable summary of a run, from its daemon or, when no
daemon answers, from the run's SQLite store.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from milepost.daemon.client import DaemonClient, DaemonError
from milepost.daemon.store import SchemaTooNew, Store
from milepost.engine.contract.layout import RunDir

N_EVENTS = 5
_BADPUT = ("startup", "recovery", "lost_progress", "checkpoint_stall", "other")
_RANK_COLS = ("role", "rank", "host", "pid", "step", "phase", "state", "heartbeat")


def _clock(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if isinstance(ts, int | float) else "-"


def _pct(x: Any) -> str:
    return f"{100.0 * x:.1f}%" if isinstance(x, int | float) else "-"


def _secs(x: Any) -> str:
    return f"{x:.1f} s" if isinstance(x, int | float) else "-"


def _cell(x: Any) -> str:
    return "-" if x is None or x == "" else str(x)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    cells = [list(header), *([_cell(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def _run_line(name: Any, state: Any, reason: Any) -> str:
    line = f"run {_cell(name)}: {_cell(state)}"
    return f"{line} ({reason})" if reason else line


def _progress_line(step: Any, target: Any) -> str:
    line = f"step {_cell(step)}/{_cell(target)}"
    if isinstance(step, int) and isinstance(target, int) and target > 0:
        line += f" ({100.0 * step / target:.1f}%)"
    return line


def _event_lines(events: Sequence[dict[str, Any]]) -> list[str]:
    if not events:
        return ["events: none"]
    # One line an event: a cause quoted from Ray or a traceback stays in the API and events.jsonl.
    rows = [
        (
            _clock(e.get("ts")),
            e.get("severity"),
            e.get("kind"),
            (str(e.get("message") or "").splitlines() or [""])[0],
        )
        for e in events
    ]
    return [f"last {len(events)} events:", *table(("time", "severity", "kind", "message"), rows)]


def _checkpoint_line(checkpoints: Sequence[dict[str, Any]]) -> str:
    if not checkpoints:
        return "checkpoint: none"
    c = max(checkpoints, key=lambda c: c.get("step", -1))
    return (
        f"checkpoint: step {c.get('step')} ({_cell(c.get('status'))}) at {_clock(c.get('committed_at'))}"
        f", world size {_cell(c.get('world_size'))}, {_cell(c.get('path'))}"
    )


def format_status(client: DaemonClient) -> str:
    """The daemon's view of the run: state, progress, goodput, ranks, recent events, newest checkpoint."""
    st = client.status()
    gp = client.goodput()
    ranks = client.ranks()
    events = list(reversed(client.events(limit=N_EVENTS, newest_first=True)))
    checkpoints = client.checkpoints()

    lines = [
        _run_line(st.get("name"), st.get("state"), st.get("reason")),
        f"{_progress_line(st.get('step'), st.get('target_steps'))}   attempt {_cell(st.get('attempt'))}"
        f"   world size {_cell(st.get('world_size'))}   restarts {_cell(st.get('restarts'))}",
    ]
    badput = gp.get("badput") or {}
    lines.append(
        f"goodput {_pct(gp.get('goodput'))} ({_secs(gp.get('productive_s'))} productive"
        f" of {_secs(gp.get('wall_s'))} wall)"
    )
    lines.append(
        "  badput: " + ", ".join(f"{b.replace('_', ' ')} {_secs(badput.get(f'{b}_s'))}" for b in _BADPUT)
    )
    if ranks:
        rows = [
            (
                *(r.get(k) for k in _RANK_COLS[:-1]),
                f"{r['heartbeat_age_seconds']:.1f}s" if r.get("heartbeat_age_seconds") is not None else None,
            )
            for r in ranks
        ]
        lines += [f"ranks ({len(ranks)}):", *table(_RANK_COLS, rows)]
    else:
        lines.append("ranks: none reporting")
    lines += _event_lines(events)
    lines.append(_checkpoint_line(checkpoints))
    return "\n".join(lines)


def format_store(run_dir: str | Path) -> str:
    """What the run's SQLite store says, for when no daemon answers. Never creates a store."""
    path = RunDir(run_dir).db
    if not path.exists():
        return f"no store at {path}"
    store = Store(run_dir)
    try:
        run = store.run() or {}
        last = store.last_step() or {}
        attempt = store.last_attempt() or {}
        events = list(reversed(store.events(limit=N_EVENTS, newest_first=True)))
        checkpoints = store.checkpoints()
    finally:
        store.close()
    lines = [
        f"from the store {path} (last updated {_clock(run.get('updated_at'))}):",
        _run_line(run.get("name"), run.get("state", "unknown"), run.get("reason")),
        f"last {_progress_line(last.get('step'), run.get('target_steps'))}, recorded {_clock(last.get('ts'))}",
    ]
    if attempt:
        lines.append(
            f"last attempt {attempt.get('number')}: {_cell(attempt.get('state'))}, pid {_cell(attempt.get('pid'))}"
            f", world size {_cell(attempt.get('world_size'))}"
        )
    lines += _event_lines(events)
    lines.append(_checkpoint_line(checkpoints))
    return "\n".join(lines)


def _no_daemon(run_dir: str, why: Exception) -> int:
    print(f"milepost status: {why}", file=sys.stderr)
    try:
        text = format_store(run_dir)
    except SchemaTooNew as e:  # the message names the file and both versions
        print(f"milepost status: {e}", file=sys.stderr)
        return 2
    print(text)
    return 1


def main_status(run_dir: str) -> int:
    """Print the run's status; 1 (after printing what the store knows) when no daemon answers;
    2 when the store's schema is newer than this milepost."""
    try:
        client = DaemonClient.from_run_dir(run_dir)
    except (DaemonError, ValueError) as e:  # ValueError: an empty token file
        return _no_daemon(run_dir, e)
    try:
        with client:
            text = format_status(client)
    except DaemonError as e:
        return _no_daemon(run_dir, e)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main_status(sys.argv[1] if len(sys.argv) > 1 else "."))
