"""Events: the run's log, filtered by kind, severity, attempt, role and rank."""

from __future__ import annotations

from typing import Any

import streamlit as st
from milepost.dashboard import source
from milepost.dashboard.views import live
from milepost.engine.contract.enums import Role, Severity
from milepost.engine.contract.events import EventKind

LIMIT = 1000


def matches(e: dict[str, Any], severities: list[str], role: str, rank: int | None) -> bool:
    return (
        (not severities or e.get("severity") in severities)
        and (role == "any" or e.get("role") == role)
        and (rank is None or e.get("rank") == rank)
    )


def render() -> None:
    st.title("Events")
    c = st.columns(5)
    kind = c[0].selectbox("kind", ["any", *sorted(k.value for k in EventKind)], key="ev_kind")
    severities = c[1].multiselect("severity", [s.value for s in Severity], key="ev_sev")
    attempt = c[2].number_input("attempt (-1: any)", min_value=-1, value=-1, step=1, key="ev_attempt")
    role = c[3].selectbox("role", ["any", *(r.value for r in Role)], key="ev_role")
    rank_text = c[4].text_input("rank", value="", key="ev_rank")
    rank = int(rank_text) if rank_text.strip().isdigit() else None
    if rank_text.strip() and rank is None:
        st.error(f"rank must be a whole number, got {rank_text!r}")

    def body() -> None:
        query: dict[str, Any] = {"newest_first": True, "limit": LIMIT}
        if kind != "any":
            query["kind"] = kind
        if attempt >= 0:
            query["attempt"] = int(attempt)
        events = source.read(f"events {kind} {attempt}", lambda cl: cl.events(**query), [])
        source.banner()
        shown = [e for e in events if matches(e, severities, role, rank)]
        st.caption(f"{len(shown)} of the newest {len(events)} events")
        st.dataframe(
            [
                {
                    "id": e["id"],
                    "time": source.fmt_ts(e.get("ts")),
                    "kind": e["kind"],
                    "severity": e.get("severity"),
                    "attempt": e.get("attempt"),
                    "role": e.get("role"),
                    "rank": e.get("rank"),
                    "step": e.get("step"),
                    "message": e.get("message"),
                }
                for e in shown
            ],
            hide_index=True,
            width="stretch",
        )

    live(body)
