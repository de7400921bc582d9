"""Runs: every run under the runs root with its state, step, goodput, restarts and firing alerts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import streamlit as st
from milepost.daemon.client import DaemonClient, DaemonError, read_daemon_file
from milepost.dashboard import nav, source
from milepost.dashboard.views import live
from milepost.engine.contract.routes import ALERTS_PATH


def summary(run_dir: Path) -> dict[str, Any]:
    """One row of the table; a run whose daemon does not answer says so instead of failing the page."""
    row: dict[str, Any] = {"run": run_dir.name, "dir": str(run_dir)}
    try:
        url, token = read_daemon_file(run_dir)["url"], source.token_of(run_dir)
        with DaemonClient(url, token=token, timeout_s=1.0) as c:
            s = c.status()
            row.update(
                state=s.get("state"),
                step=s.get("step"),
                target=s.get("target_steps"),
                goodput=s.get("goodput"),
                restarts=s.get("restarts"),
                firing=firing_alerts(url, token),
            )
    except DaemonError as e:
        row.update(state="daemon down", error=e.message[:120])
    return row


def firing_alerts(url: str, token: str | None) -> int | None:
    """Firing alerts of a run; None where its daemon has no alerts API."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = httpx.get(f"{url}{ALERTS_PATH}", headers=headers, timeout=1.0, trust_env=False)
    except httpx.TransportError:
        return None
    if not resp.is_success:
        return None
    alerts = resp.json().get("alerts", [])
    return sum(1 for a in alerts if a.get("status") == "firing")


def render() -> None:
    st.title("Runs")
    s = source.settings()
    dirs = source.run_dirs(s.runs_root)
    if s.run_dir and Path(s.run_dir).resolve() not in [d.resolve() for d in dirs]:
        dirs.insert(0, Path(s.run_dir))
    st.caption(f"runs under {Path(s.runs_root).resolve()}")

    def body() -> None:
        if not dirs:
            st.info(f"No runs under {s.runs_root} (a run dir holds daemon.json or milepost.db).")
            return
        rows = [summary(d) for d in dirs]
        st.dataframe(rows, hide_index=True, width="stretch")

    live(body)
    if dirs:
        names = {d.name: str(d) for d in dirs}
        current = source.chosen_run_dir()
        labels = list(names)
        index = next((i for i, n in enumerate(labels) if names[n] == current), 0)
        choice = st.selectbox("run", labels, index=index, key="run_pick")
        if st.button("Open overview", type="primary"):
            source.pick_run(names[choice])
            nav.go("overview")
