"""Where the dashboard's data comes from: the daemon's HTTP API, through DaemonClient only.

Which daemon: ``milepost dashboard`` passes its flags as environment variables (``ENV_*``),
so the app, its pages and the tests all read one place. A run picked in the Runs view (or
named by ``?run=`` in a link, as alerts make them) overrides the default run dir.

Every read goes through :func:`read`: a good answer is kept in the session (per daemon URL
and read), a failed one marks the daemon down and returns the kept answer, so a view keeps
its last data under a banner and recovers by itself on the next live refresh.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import streamlit as st
from milepost.daemon.client import DaemonClient, DaemonError, DaemonUnreachable, read_daemon_file
from milepost.engine.contract.layout import DAEMON_FILE, DB_FILE, TOKEN_FILE
from milepost.engine.contract.process import TOKEN_ENV

ENV_API = "MILEPOST_DASHBOARD_API"
ENV_RUN_DIR = "MILEPOST_DASHBOARD_RUN_DIR"
ENV_RUNS_ROOT = "MILEPOST_DASHBOARD_RUNS_ROOT"
ENV_REFRESH = "MILEPOST_DASHBOARD_REFRESH_S"
READ_TIMEOUT_S = 2.0  # a hung daemon must not freeze the page: the banner shows within this
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    api: str | None
    run_dir: str | None
    runs_root: str
    refresh_s: float

    @classmethod
    def from_env(cls) -> Settings:
        refresh = os.environ.get(ENV_REFRESH, "2")
        try:
            refresh_s = float(refresh)
        except ValueError:
            raise ValueError(f"{ENV_REFRESH} must be a number of seconds, got {refresh!r}") from None
        if refresh_s <= 0:
            raise ValueError(f"{ENV_REFRESH} must be > 0, got {refresh!r}")
        return cls(
            api=os.environ.get(ENV_API) or None,
            run_dir=os.environ.get(ENV_RUN_DIR) or None,
            runs_root=os.environ.get(ENV_RUNS_ROOT) or "runs",
            refresh_s=refresh_s,
        )


def settings() -> Settings:
    return Settings.from_env()


def run_dirs(root: str | Path) -> list[Path]:
    """Every run directory directly under ``root`` (one with a daemon.json or a store), newest first."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = [
        p for p in base.iterdir() if p.is_dir() and ((p / DAEMON_FILE).exists() or (p / DB_FILE).exists())
    ]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def chosen_run_dir() -> str | None:
    """The run the views show: picked in Runs, else ``?run=`` under the runs root, else the default."""
    if picked := st.session_state.get("run_dir"):
        return str(picked)
    s = settings()
    if (name := st.query_params.get("run")) and (Path(s.runs_root) / name).is_dir():
        return str(Path(s.runs_root) / name)
    return s.run_dir


def pick_run(run_dir: str) -> None:
    st.session_state["run_dir"] = run_dir


@dataclass(frozen=True)
class Target:
    url: str
    token: str | None
    label: str


def target() -> Target | None:
    """The daemon to read: ``--api URL`` if given and no run was picked, else the run dir's daemon.json."""
    s = settings()
    run_dir = chosen_run_dir()
    if s.api and not st.session_state.get("run_dir"):
        token = os.environ.get(TOKEN_ENV) or st.session_state.get("token") or None
        return Target(s.api.rstrip("/"), token, s.api)
    if not run_dir:
        return None
    try:
        url = read_daemon_file(run_dir)["url"]
    except DaemonUnreachable as e:
        _mark_down(str(e))
        cached = st.session_state.get("last_target")
        return cached if isinstance(cached, Target) and cached.label == run_dir else None
    t = Target(url, token_of(run_dir) or st.session_state.get("token"), run_dir)
    st.session_state["last_target"] = t
    return t


def token_of(run_dir: str | Path) -> str | None:
    """$MILEPOST_TOKEN, else the run dir's token file (never created here)."""
    if env := os.environ.get(TOKEN_ENV):
        return env
    try:
        return (Path(run_dir) / TOKEN_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def client(t: Target | None = None) -> DaemonClient | None:
    """One client per (URL, token) for the session (its connection is reused across refreshes)."""
    t = t or target()
    if t is None:
        return None
    clients: dict[tuple[str, str | None], DaemonClient] = st.session_state.setdefault("clients", {})
    key = (t.url, t.token)
    if key not in clients:
        clients[key] = DaemonClient(t.url, token=t.token, timeout_s=READ_TIMEOUT_S)
    return clients[key]


def _mark_down(message: str) -> None:
    down = st.session_state.get("down")
    st.session_state["down"] = {"message": message, "since": down["since"] if down else time.time()}


def read(name: str, fn: Callable[[DaemonClient], T], default: T) -> T:
    """``fn(client)``; on failure the last good answer of ``name`` (else ``default``) and a banner.

    A 404 means this daemon lacks the route (an older daemon): ``default``, and no banner.
    """
    t = target()
    c = client(t)
    cache: dict[str, tuple[Any, float]] = st.session_state.setdefault("cache", {})
    key = f"{t.url if t else '-'} {name}"
    if c is None:
        return cache.get(key, (default, 0.0))[0]
    try:
        value = fn(c)
    except DaemonUnreachable as e:
        _mark_down(e.message)
        return cache.get(key, (default, 0.0))[0]
    except DaemonError as e:
        if e.status_code == 404:
            st.session_state.setdefault("missing", set()).add(name)
            return default
        st.session_state.setdefault("errors", {})[name] = str(e)
        return cache.get(key, (default, 0.0))[0]
    st.session_state.pop("down", None)
    st.session_state.get("missing", set()).discard(name)
    cache[key] = (value, time.time())
    return value


def raw(method: str, path: str, body: dict[str, Any] | None = None, *, write: bool = False) -> Any:
    """A call to a route DaemonClient has no method for yet (alerts, silences); raises like the client."""
    t = target()
    if t is None:
        raise DaemonUnreachable("no daemon chosen: pick a run or pass --api")
    token = write_token() if write else t.token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=t.url, timeout=READ_TIMEOUT_S, trust_env=False) as h:
            resp = h.request(method, path, json=body, headers=headers)
    except httpx.TransportError as e:
        raise DaemonUnreachable(f"cannot reach the daemon at {t.url}: {e}") from e
    if not resp.is_success:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        raise DaemonError(resp.status_code, str(detail))
    return resp.json() if resp.content else {}


def write_token() -> str | None:
    """The token for writes: the run dir's or $MILEPOST_TOKEN, else what the user typed in the sidebar."""
    t = target()
    return (t.token if t else None) or st.session_state.get("token") or None


def writer() -> DaemonClient | None:
    """A client that carries the write token; None when there is none."""
    t = target()
    token = write_token()
    if t is None or not token:
        return None
    return DaemonClient(t.url, token=token, timeout_s=10.0)


def banner() -> None:
    """The daemon-down banner (with the age of the data shown), or nothing."""
    down = st.session_state.get("down")
    if down:
        age = time.time() - down["since"]
        st.error(
            f"Daemon unreachable for {age:.0f} s: {down['message']}. Showing the last data received; "
            "reconnecting by itself.",
            icon="⚠️",
        )
    elif chosen_run_dir() is None and not settings().api:
        st.info("No run chosen: pick one in Runs, or start with --run-dir or --api.")


def fmt_ts(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"
