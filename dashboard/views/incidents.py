"""Incidents: every diagnosis with its culprits, collective, each rank's phase, stacks,
flight-recorder summary and recovery timeline (fault -> ... -> first step) as a chart."""

from __future__ import annotations

from typing import Any

import streamlit as st
from milepost.dashboard import charts, source
from milepost.dashboard.views import live


def culprits(d: dict[str, Any]) -> str:
    return ", ".join(f"{role} {rank}" for role, rank in (d.get("culprit_ranks") or [])) or "-"


def render() -> None:
    st.title("Incidents")

    def body() -> None:
        diags = source.read("diagnoses", lambda c: c.diagnoses(), [])
        source.banner()
        if not diags:
            st.success("No diagnoses: no hang, desync or straggler detected in this run.")
            return
        st.dataframe(
            [
                {
                    "id": d["id"],
                    "kind": d["kind"],
                    "culprits": culprits(d),
                    "group": d.get("group"),
                    "seq": d.get("seq"),
                    "op": d.get("op"),
                    "detected": source.fmt_ts(d.get("detected_at")),
                    "action": d.get("action"),
                }
                for d in diags
            ],
            hide_index=True,
            width="stretch",
        )
        ids = [int(d["id"]) for d in diags]
        wanted = st.query_params.get("diagnosis")
        index = ids.index(int(wanted)) if wanted and wanted.isdigit() and int(wanted) in ids else 0
        chosen = st.selectbox("diagnosis", ids, index=index, key="incident_pick")
        d = next(x for x in diags if int(x["id"]) == chosen)
        show(d)

    live(body)


def show(d: dict[str, Any]) -> None:
    st.subheader(f"Diagnosis {d['id']}: {d['kind']}")
    st.markdown(
        f"**culprits** {culprits(d)} · **collective** group `{d.get('group')}` seq `{d.get('seq')}` "
        f"op `{d.get('op')}` · **onset** {source.fmt_ts(d.get('onset_at'))} · "
        f"**detected** {source.fmt_ts(d.get('detected_at'))} · **action** {d.get('action') or '-'}"
    )
    if d.get("message"):
        st.caption(d["message"])
    ev = source.read(f"evidence {d['id']}", lambda c: c.evidence(int(d["id"])), {})
    points = source.read(f"timeline {d['id']}", lambda c: c.recovery_timeline(int(d["id"])), [])
    st.subheader("Recovery timeline")
    if points:
        st.altair_chart(charts.recovery_timeline(points), width="stretch")
    else:
        st.info("No recovery stages yet.")
    phases = ev.get("phases") or d.get("phases") or {}
    st.subheader("Each rank's phase")
    st.dataframe(
        [{"rank": who, "phase@step": p} for who, p in sorted(phases.items())],
        hide_index=True,
        width="stretch",
    )
    st.subheader("Stacks (py-spy)")
    stacks = ev.get("stacks") or {}
    if not stacks:
        st.info("No stacks collected (yet).")
    for who, text in sorted(stacks.items()):
        with st.expander(who, expanded=False):
            st.code(text, language="text")
    st.subheader("Flight recorder")
    frs = ev.get("flight_recorder") or []
    if not frs:
        st.info("No flight-recorder dumps for this attempt.")
    for fr in frs:
        stuck = fr.get("stuck") or {}
        st.markdown(
            f"`{fr.get('file')}`: {fr.get('role')} {fr.get('rank')} stuck in {stuck.get('op')} "
            f"(group {stuck.get('group')}, seq {stuck.get('seq')}); {fr.get('entries', 0)} entries"
        )
        status = fr.get("pg_status") or {}
        if status:
            st.dataframe(
                [{"group": g, **v} for g, v in status.items() if isinstance(v, dict)],
                hide_index=True,
                width="stretch",
            )
