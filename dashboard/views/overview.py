"""Overview: state, step of target, ETA, goodput and its badput buckets, restarts, learning curves, last events."""

from __future__ import annotations

import statistics
from typing import Any

import streamlit as st
from milepost.dashboard import charts, source
from milepost.dashboard.views import live

KEEP_STEPS = 2000  # curves show at most this many of the newest steps


def new_steps() -> list[dict[str, Any]]:
    """The session's steps, topped up with those after the newest it holds (a refresh reads only those)."""
    t = source.target()
    key = f"steps {t.url if t else '-'}"
    held: list[dict[str, Any]] = st.session_state.get(key, [])
    since = held[-1]["step"] if held else 0
    more = source.read("steps", lambda c: c.steps(since=since, limit=KEEP_STEPS), [])
    if more and held and more[0]["step"] <= since:
        held = []  # a different run behind the same URL
    held = (held + more)[-KEEP_STEPS:]
    st.session_state[key] = held
    return held


def eta_s(status: dict[str, Any], steps: list[dict[str, Any]]) -> float | None:
    """Remaining steps times the median wall time between recent steps."""
    target, step = status.get("target_steps"), status.get("step")
    gaps = [
        b["ts"] - a["ts"]
        for a, b in zip(steps[-21:], steps[-20:], strict=False)
        if b.get("ts") and a.get("ts")
    ]
    if not target or step is None or not gaps:
        return None
    return max(0, target - step) * statistics.median(gaps)


def render() -> None:
    st.title("Overview")

    def body() -> None:
        status = source.read("status", lambda c: c.status(), {})
        goodput = source.read("goodput", lambda c: c.goodput(), {})
        steps = new_steps()
        events = source.read("last_events", lambda c: c.events(newest_first=True, limit=15), [])
        source.banner()
        top, bottom = st.columns(3), st.columns(3)
        top[0].metric("state", status.get("state", "-"))
        top[1].metric("step", f"{status.get('step', '-')} / {status.get('target_steps', '-')}")
        eta = eta_s(status, steps)
        top[2].metric("ETA", f"{eta / 60:.1f} min" if eta is not None else "-")
        gp = status.get("goodput")
        bottom[0].metric("goodput", f"{gp:.1%}" if isinstance(gp, float) else "-")
        bottom[1].metric("restarts", status.get("restarts", "-"))
        bottom[2].metric("attempt", status.get("attempt", "-"))
        if status.get("reason"):
            st.caption(f"reason: {status['reason']}")
        left, right = st.columns([1, 2])
        with left:
            st.subheader("Goodput")
            if goodput:
                st.altair_chart(charts.goodput_bars(goodput), width="stretch")
        with right:
            st.subheader("Last events")
            st.dataframe(
                [
                    {
                        "time": source.fmt_ts(e.get("ts")),
                        "kind": e["kind"],
                        "severity": e.get("severity"),
                        "attempt": e.get("attempt"),
                        "message": e.get("message"),
                    }
                    for e in events
                ],
                hide_index=True,
                width="stretch",
                height=220,
            )
        st.subheader("Learning and throughput")
        st.altair_chart(charts.curves(steps), width="content")

    live(body)
