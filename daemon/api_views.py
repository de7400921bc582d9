"""Read routes shaped for the dashboard, and the bounded history they read.

- ``GET /api/v1/ranks/matrix``: compute seconds per rank over the last steps as one compact
  matrix (a page of ranks, sorted), with per-step aggregates over every rank and each rank's
  straggler score, so a view of 1024 ranks is one small request;
- ``GET /api/v1/collectives``: the collectives open now, and count, mean and max duration and
  busbw per op and group in time buckets;
- ``GET /api/v1/steps/{step}/trace``: the spans of one step's trace (driver and ranks);
- ``GET /api/v1/diagnoses/{id}/evidence``: a diagnosis's py-spy stacks and flight-recorder summary;
- ``GET /api/v1/diagnoses/{id}/timeline``: its recovery, fault -> first step of the new attempt.

The store keeps only each rank's newest report, so :class:`ViewHistory` (a bus subscriber)
keeps the per-step compute time and the collective deltas, bounded in steps and buckets.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from fastapi import Path as PathParam
from milepost.engine.contract.events import EventKind
from milepost.engine.contract.layout import RunDir
from milepost.engine.contract.routes import (
    COLLECTIVES_PATH,
    RANK_MATRIX_PATH,
    diagnosis_evidence_path,
    diagnosis_timeline_path,
    step_trace_path,
)
from milepost.engine.contract.wire import I64_MAX

from .api_models import CollectivesView, EvidenceView, RankMatrix, RecoveryTimeline
from .collective_metrics import busbw_factor, normalize_op
from .store import Store
from .telemetry_service import Telemetry, TraceSpans

MAX_STACK_BYTES = 64 * 1024  # per stack file: a page of py-spy output, not a megabyte of it
SortKey = Literal["rank", "score", "last"]


class ViewHistory:
    """Per-rank compute seconds by step and per-(op, group) collective buckets, from the ranks' reports."""

    KEEP_STEPS = 256
    BUCKET_S = 10.0
    KEEP_BUCKETS = 360  # an hour of 10 s buckets

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.compute: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
        self._last: dict[tuple[int, str, int, str], tuple[int, float, int]] = {}
        # (bucket start, op, group) -> [count, seconds, bytes, world, max_s]
        self.buckets: dict[tuple[float, str, str], list[float]] = {}

    def on_report(self, rep: dict[str, Any]) -> None:
        role, rank, attempt = str(rep.get("role")), int(rep.get("rank", 0)), int(rep.get("attempt", 0))
        with self._lock:
            for step, seconds in rep.get("compute_hist") or []:
                self._add_compute(role, rank, int(step), float(seconds))
            for key, s in (rep.get("collectives") or {}).items():
                op, _, group = str(key).partition("|")
                now = (int(s.get("count", 0)), float(s.get("seconds", 0.0)), int(s.get("bytes", 0)))
                before = self._last.get((attempt, role, rank, key), (0, 0.0, 0))
                self._last[(attempt, role, rank, key)] = now
                if now[0] > before[0]:
                    b = self._bucket(float(rep.get("ts", time.time())), op, group)
                    b[0] += now[0] - before[0]
                    b[1] += max(0.0, now[1] - before[1])
                    b[2] += max(0, now[2] - before[2])
                    b[3] = max(b[3], int(s.get("world", 1)))
            for group, _seq, op, enter_ts, dur in rep.get("recent_collectives") or []:
                b = self._bucket(float(enter_ts), str(op), str(group))
                b[4] = max(b[4], float(dur))
            self._prune()

    def add_compute(self, role: str, rank: int, step: int, seconds: float) -> None:
        """Bulk input for simulations (the dashboard bench's 1024 ranks)."""
        with self._lock:
            self._add_compute(role, rank, step, seconds)

    def _add_compute(self, role: str, rank: int, step: int, seconds: float) -> None:
        d = self.compute[(role, rank)]
        d[step] = seconds
        if len(d) > self.KEEP_STEPS + 32:  # prune in batches: sorting each report would cost more
            for s in sorted(d)[: len(d) - self.KEEP_STEPS]:
                del d[s]

    def _bucket(self, ts: float, op: str, group: str) -> list[float]:
        start = ts - ts % self.BUCKET_S
        return self.buckets.setdefault((start, normalize_op(op), group), [0, 0.0, 0, 1, 0.0])

    def _prune(self) -> None:
        if len(self.buckets) > self.KEEP_BUCKETS * 8:
            for k in sorted(self.buckets)[: len(self.buckets) - self.KEEP_BUCKETS * 4]:
                del self.buckets[k]
        if len(self._last) > 65536:  # keys of attempts long gone
            self._last.clear()

    def matrix(self, role: str, steps: int, offset: int, limit: int, sort: SortKey) -> dict[str, Any]:
        with self._lock:
            per_rank = {rank: dict(d) for (r, rank), d in self.compute.items() if r == role and d}
        ranks = sorted(per_rank)
        cols = sorted({s for d in per_rank.values() for s in d})[-steps:]
        m = np.full((len(ranks), len(cols)), np.nan)
        index = {s: j for j, s in enumerate(cols)}
        for i, rank in enumerate(ranks):
            for s, v in per_rank[rank].items():
                if (j := index.get(s)) is not None:
                    m[i, j] = v
        scores, last = _scores(m), _last_values(m)
        order = list(range(len(ranks)))
        if sort == "score":
            order.sort(key=lambda i: -np.nan_to_num(scores[i], nan=-1.0))
        elif sort == "last":
            order.sort(key=lambda i: -np.nan_to_num(last[i], nan=-1.0))
        page = order[offset : offset + limit]
        with np.errstate(all="ignore"):
            agg = {
                name: _floats(fn(m, axis=0)) if len(ranks) else []
                for name, fn in (
                    ("min", np.nanmin),
                    ("p50", np.nanmedian),
                    ("max", np.nanmax),
                    ("mean", np.nanmean),
                )
            }
            agg["p90"] = _floats(np.nanpercentile(m, 90, axis=0)) if len(ranks) else []
        return {
            "role": role,
            "metric": "compute_s",
            "steps": cols,
            "total_ranks": len(ranks),
            "offset": offset,
            "sort": sort,
            "ranks": [ranks[i] for i in page],
            "values": [_floats(m[i]) for i in page],
            "scores": _floats(scores[page]) if page else [],
            "last": _floats(last[page]) if page else [],
            "aggregate": agg,
        }

    def series(self, since: float) -> list[dict[str, Any]]:
        with self._lock:
            items = [(k, list(v)) for k, v in self.buckets.items() if k[0] >= since]
        out = []
        for (t, op, group), (count, seconds, nbytes, world, max_s) in sorted(items):
            algbw = nbytes / seconds if seconds > 0 else 0.0
            out.append(
                {
                    "t": t,
                    "op": op,
                    "group": group,
                    "count": int(count),
                    "mean_s": seconds / count if count else None,
                    "max_s": max_s,
                    "busbw_bytes_per_second": algbw * busbw_factor(op, int(world)),
                }
            )
        return out


def _floats(a: Any) -> list[float | None]:
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(a, dtype=float)]


def _scores(m: np.ndarray) -> np.ndarray:
    """Each rank's median over steps of its time over the step's median rank (1.0: on pace)."""
    if m.size == 0:
        return np.zeros(m.shape[0])
    with np.errstate(all="ignore"):
        ref = np.maximum(np.nanmedian(m, axis=0), 1e-9)
        return np.asarray(np.nanmedian(m / ref, axis=1))


def _last_values(m: np.ndarray) -> np.ndarray:
    out = np.full(m.shape[0], np.nan)
    for i in range(m.shape[0]):
        ok = np.flatnonzero(np.isfinite(m[i]))
        if ok.size:
            out[i] = m[i, ok[-1]]
    return out


def recovery_timeline(
    diag: dict[str, Any], events: list[dict[str, Any]], first_steps: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """fault -> detected -> attempt ended -> restarted -> resume verified -> first step, as far as it got.

    ``events``: the run's events of the kinds below, any order; ``first_steps``: step records
    after the detection (oldest first). A stage that has not happened yet is absent.
    """
    detected = float(diag.get("detected_at") or 0.0)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in sorted(events, key=lambda e: float(e.get("ts") or 0.0)):
        by_kind[str(e["kind"])].append(e)
    points: list[dict[str, Any]] = []
    faults = [e for e in by_kind[EventKind.FAULT_INJECTED] if float(e["ts"]) <= detected]
    if faults:
        points.append({"stage": "fault", "ts": float(faults[-1]["ts"]), "detail": faults[-1].get("message")})
    elif diag.get("onset_at"):
        points.append(
            {"stage": "fault", "ts": float(diag["onset_at"]), "detail": "onset (no injected fault)"}
        )
    points.append({"stage": "detected", "ts": detected, "detail": diag.get("kind")})
    after = float(detected)
    for stage, kinds in (
        ("attempt ended", (EventKind.ATTEMPT_ENDED, EventKind.ATTEMPT_KILLED)),
        ("restarted", (EventKind.ATTEMPT_LAUNCHED,)),
        ("resume verified", (EventKind.RESUME_VERIFIED,)),
    ):
        found = sorted(
            (e for k in kinds for e in by_kind[k] if float(e["ts"]) >= after), key=lambda e: float(e["ts"])
        )
        if not found:
            return points
        after = float(found[0]["ts"])
        points.append({"stage": stage, "ts": after, "detail": found[0].get("message")})
    first = [s for s in first_steps if float(s.get("ts") or 0.0) >= after]
    if first:
        points.append(
            {"stage": "first step", "ts": float(first[0]["ts"]), "detail": f"step {first[0]['step']}"}
        )
    return points


def _read_capped(path: Path, root: Path) -> str:
    try:
        resolved = path.resolve()
        if not resolved.is_relative_to(root.resolve()):
            return f"(not under {root}: not served)"
        with resolved.open("rb") as f:
            data = f.read(MAX_STACK_BYTES + 1)
    except OSError as e:
        return f"(cannot read {path.name}: {e})"
    text = data[:MAX_STACK_BYTES].decode("utf-8", "replace")
    return text + ("\n... (truncated)" if len(data) > MAX_STACK_BYTES else "")


def fr_summary(path: Path) -> dict[str, Any]:
    """One flight-recorder dump as: who, the stuck collective, each group's last enqueued/completed seq."""
    try:
        dump = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"file": path.name, "error": str(e)}
    fr = dump.get("flight_recorder") or {}
    entries = fr.get("entries") or []
    return {
        "file": path.name,
        "role": dump.get("role"),
        "rank": dump.get("rank"),
        "stuck": dump.get("stuck"),
        "pg_status": fr.get("pg_status") or {},
        "entries": len(entries),
        "last_entries": entries[-5:],
    }


class CheckpointSizes:
    """Bytes on disk of each checkpoint dir, measured once per (path, status): a commit is immutable."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._sizes: dict[tuple[str, str], int | None] = {}

    def __call__(self) -> list[dict[str, Any]]:
        rows = self.store.checkpoints()
        for r in rows:
            key = (str(r.get("path") or ""), str(r.get("status") or ""))
            if key not in self._sizes:
                self._sizes[key] = _dir_bytes(Path(key[0])) if key[0] else None
            r["size_bytes"] = self._sizes[key]
        return rows


def _dir_bytes(path: Path) -> int | None:
    try:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return None


def install_view_routes(
    app: FastAPI,
    store: Store,
    controller: Any,
    telemetry: Telemetry,
    history: ViewHistory,
    *,
    read_deps: list[Any],
    read_errors: dict[int | str, dict[str, Any]],
) -> None:
    """The dashboard's read routes (guarded like every read); ``history`` is fed by the bus."""
    from .api import json_safe

    not_found: dict[int | str, dict[str, Any]] = {**read_errors, 404: {"description": "no such item"}}

    @app.get(RANK_MATRIX_PATH, response_model=RankMatrix, dependencies=read_deps, responses=read_errors)
    def rank_matrix(
        role: Annotated[str, Query(max_length=32)] = "trainer",
        steps: Annotated[int, Query(ge=1, le=ViewHistory.KEEP_STEPS)] = 200,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
        limit: Annotated[int, Query(ge=1, le=4096)] = 64,
        sort: SortKey = "rank",
    ) -> dict[str, Any]:
        return json_safe(history.matrix(role, steps, offset, limit, sort))

    @app.get(COLLECTIVES_PATH, response_model=CollectivesView, dependencies=read_deps, responses=read_errors)
    def collectives(window_s: Annotated[float, Query(gt=0, le=86400)] = 600.0) -> dict[str, Any]:
        now = time.time()
        in_flight = [
            {
                "role": r["role"],
                "rank": r["rank"],
                **c,
                "age_s": max(0.0, now - float(c.get("enter_ts", now))),
            }
            for r in controller.ranks()
            for c in r.get("open_collectives") or []
        ]
        return json_safe({"now": now, "in_flight": in_flight, "series": history.series(now - window_s)})

    @app.get(
        step_trace_path("{step}"), response_model=TraceSpans, dependencies=read_deps, responses=not_found
    )
    def step_trace(step: Annotated[int, PathParam(ge=0, le=I64_MAX)]) -> dict[str, Any]:
        rec = store.steps(since=step - 1, limit=1)
        trace_id = rec[0].get("trace_id", "") if rec and rec[0]["step"] == step else ""
        if not trace_id:
            found = [t for t in telemetry.traces.ring.recent(1000) if t.get("step") == step]
            trace_id = found[0]["trace_id"] if found else ""
        spans = telemetry.traces.ring.trace(trace_id) if trace_id else []
        if not spans:
            raise HTTPException(404, f"no spans of step {step} are held")
        return {"trace_id": trace_id, "spans": json_safe(spans)}

    def diagnosis(diag_id: int) -> dict[str, Any]:
        for d in store.diagnoses(limit=1000):
            if int(d["id"]) == diag_id:
                return d
        raise HTTPException(404, f"no diagnosis {diag_id}")

    @app.get(
        diagnosis_evidence_path("{diag_id}"),
        response_model=EvidenceView,
        dependencies=read_deps,
        responses=not_found,
    )
    def evidence(diag_id: Annotated[int, PathParam(ge=0, le=I64_MAX)]) -> dict[str, Any]:
        d = diagnosis(diag_id)
        ev = d.get("evidence") or {}
        root = RunDir(store.path.parent).diagnostics
        stacks = {name: _read_capped(Path(p), root) for name, p in (ev.get("stacks") or {}).items()}
        frs = [fr_summary(Path(p)) for p in ev.get("flight_recorder") or [] if Path(p).is_relative_to(root)]
        return json_safe(
            {"id": diag_id, "phases": d.get("phases") or {}, "stacks": stacks, "flight_recorder": frs}
        )

    @app.get(
        diagnosis_timeline_path("{diag_id}"),
        response_model=RecoveryTimeline,
        dependencies=read_deps,
        responses=not_found,
    )
    def timeline(diag_id: Annotated[int, PathParam(ge=0, le=I64_MAX)]) -> dict[str, Any]:
        d = diagnosis(diag_id)
        kinds = (
            EventKind.FAULT_INJECTED,
            EventKind.ATTEMPT_ENDED,
            EventKind.ATTEMPT_KILLED,
            EventKind.ATTEMPT_LAUNCHED,
            EventKind.RESUME_VERIFIED,
        )
        events = [e for k in kinds for e in store.events(kind=k, limit=1000, newest_first=True)]
        steps = [
            s for s in store.recent_steps(500) if float(s.get("ts") or 0) >= float(d.get("detected_at") or 0)
        ]
        return {"id": diag_id, "points": json_safe(recovery_timeline(d, events, steps))}
