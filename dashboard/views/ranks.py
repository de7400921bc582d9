"""Ranks: compute time per rank over steps (heatmap of one page of ranks, band over all), heartbeat
age, phase now and straggler scores; sorted and paged so 1024 ranks stay readable."""

from __future__ import annotations

from typing import Any

import streamlit as st
from milepost.dashboard import charts, source
from milepost.dashboard.views import live

STALE_HEARTBEAT_S = 10.0
HISTORY_EVERY_S = 10.0  # the per-step charts refresh this often


def rank_rows(ranks: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [
        {
            "rank": r["rank"],
            "host": r.get("host"),
            "step": r.get("step"),
            "phase": r.get("phase"),
            "state": r.get("state"),
            "heartbeat age s": round(float(r.get("heartbeat_age_seconds") or 0.0), 1),
            "open collectives": len(r.get("open_collectives") or []),
        }
        for r in ranks
        if r.get("role") == role
    ]


def render() -> None:
    st.title("Ranks")
    c1, c2, c3, c4 = st.columns(4)
    role = c1.selectbox("role", ["trainer", "rollout", "driver"], key="ranks_role")
    sort = c2.selectbox(
        "sort",
        ["score", "rank", "last"],
        key="ranks_sort",
        help="score: slowest relative to the step's median",
    )
    size = int(c3.selectbox("ranks per page", [32, 64, 128, 256], index=1, key="ranks_size"))
    page = int(c4.number_input("page", min_value=1, value=1, step=1, key="ranks_page"))

    def now() -> None:
        ranks = source.read("ranks", lambda c: c.ranks(), [])
        source.banner()
        rows = rank_rows(ranks, role)
        stale = [r["rank"] for r in rows if r["heartbeat age s"] > STALE_HEARTBEAT_S]
        m = st.columns(3)
        m[0].metric("ranks reporting", len(rows))
        m[1].metric("stale heartbeats", len(stale), help=f"heartbeat older than {STALE_HEARTBEAT_S:.0f} s")
        phases: dict[str, int] = {}
        for r in rows:
            phases[str(r["phase"])] = phases.get(str(r["phase"]), 0) + 1
        m[2].metric("phases now", ", ".join(f"{k} {v}" for k, v in sorted(phases.items())) or "-")
        if stale:
            st.warning(f"stale heartbeats: ranks {stale[:20]}{' ...' if len(stale) > 20 else ''}")
        with st.expander(f"Ranks now: page {page} ({size} per page, by rank)", expanded=len(rows) <= size):
            st.dataframe(rows[(page - 1) * size : page * size], hide_index=True, width="stretch")

    def history() -> None:
        matrix = source.read(
            f"matrix {role} {sort} {size} {page}",
            lambda c: c.rank_matrix(role=role, steps=200, offset=(page - 1) * size, limit=size, sort=sort),
            {},
        )
        total = matrix.get("total_ranks", 0)
        scores = [s for s in matrix.get("scores", []) if s is not None]
        m = st.columns(2)
        m[0].metric("ranks", total)
        m[1].metric("worst straggler score", f"{max(scores):.2f}" if scores and sort == "score" else "-")
        if not matrix.get("steps"):
            st.info("No per-step compute times reported yet.")
            return
        first = (page - 1) * size
        st.subheader(
            f"Compute time per rank: ranks {first + 1}-{first + len(matrix['ranks'])} of {total}, by {sort}"
        )
        st.altair_chart(charts.heatmap(matrix), width="stretch")
        st.subheader(f"Compute time, all {total} ranks (min-max band, p50, p90)")
        st.altair_chart(charts.aggregate_band(matrix), width="stretch")
        st.dataframe(
            [
                {"rank": r, "straggler score": s, "last compute s": v}
                for r, s, v in zip(matrix["ranks"], matrix["scores"], matrix["last"], strict=False)
            ],
            hide_index=True,
            width="stretch",
        )

    live(now)
    # Redrawing a heatmap of thousands of cells every second would keep the browser busy: slower.
    live(history, every_s=max(HISTORY_EVERY_S, 5 * source.settings().refresh_s))
