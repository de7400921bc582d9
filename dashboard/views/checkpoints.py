"""Checkpoints: timeline and sizes, save stall per step, verification results and resumes."""

from __future__ import annotations

from typing import Any

import streamlit as st
from milepost.dashboard import charts, source
from milepost.dashboard.views import live
from milepost.dashboard.views.overview import new_steps
from milepost.engine.contract.events import EventKind

KINDS = (
    EventKind.CHECKPOINT_COMMITTED,
    EventKind.CHECKPOINT_FAILED,
    EventKind.CHECKPOINT_SKIPPED,
    EventKind.CHECKPOINT_CORRUPTED,
    EventKind.RESUME_VERIFIED,
    EventKind.RESUME_VERIFICATION_FAILED,
)


def checkpoint_events(c: Any) -> list[dict[str, Any]]:
    rows = [e for k in KINDS for e in c.events(kind=k, newest_first=True, limit=200)]
    return sorted(rows, key=lambda e: -int(e["id"]))


def render() -> None:
    st.title("Checkpoints")

    def body() -> None:
        ckpts = source.read("checkpoints", lambda c: c.checkpoints(), [])
        events = source.read("checkpoint_events", checkpoint_events, [])
        steps = new_steps()
        source.banner()
        committed = [c for c in ckpts if c.get("status") == "committed"]
        m = st.columns(4)
        m[0].metric("checkpoints", len(ckpts))
        m[1].metric("newest committed step", committed[0]["step"] if committed else "-")
        resumes = [e for e in events if e["kind"] == EventKind.RESUME_VERIFIED]
        bad = [e for e in events if e["kind"] == EventKind.RESUME_VERIFICATION_FAILED]
        m[2].metric("verified resumes", len(resumes))
        m[3].metric("failed verifications", len(bad))
        if ckpts:
            st.subheader("Timeline (size = bytes on disk)")
            st.altair_chart(charts.checkpoint_timeline(ckpts), width="stretch")
        st.subheader("Save stall (the step's checkpoint phase)")
        st.altair_chart(charts.stall_bars(steps), width="stretch")
        st.subheader("Checkpoints")
        st.dataframe(
            [
                {
                    "step": c["step"],
                    "status": c.get("status"),
                    "MiB": round((c.get("size_bytes") or 0) / 2**20, 2),
                    "world size": c.get("world_size"),
                    "checksum": (c.get("state_checksum") or "")[:12],
                    "committed": source.fmt_ts(c.get("committed_at")),
                    "attempt": c.get("attempt"),
                    "reason": c.get("reason"),
                }
                for c in ckpts
            ],
            hide_index=True,
            width="stretch",
        )
        st.subheader("Verification and resumes")
        st.dataframe(
            [
                {
                    "time": source.fmt_ts(e.get("ts")),
                    "kind": e["kind"],
                    "attempt": e.get("attempt"),
                    "step": e.get("step"),
                    "message": e.get("message"),
                }
                for e in events
            ],
            hide_index=True,
            width="stretch",
        )

    live(body)
