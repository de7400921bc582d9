"""Collectives: those in flight now (oldest first), and duration and busbw per op and group over time."""

from __future__ import annotations

import streamlit as st
from milepost.dashboard import charts, source
from milepost.dashboard.views import live


def render() -> None:
    st.title("Collectives")
    window_min = st.select_slider("window (minutes)", [5, 10, 30, 60], value=10, key="coll_window")

    def body() -> None:
        data = source.read("collectives", lambda c: c.collectives(window_s=window_min * 60.0), {})
        source.banner()
        in_flight = sorted(data.get("in_flight", []), key=lambda c: -float(c.get("age_s") or 0))
        st.subheader(f"In flight now: {len(in_flight)}")
        st.dataframe(
            [
                {
                    "role": c["role"],
                    "rank": c["rank"],
                    "op": c["op"],
                    "group": c["group"],
                    "seq": c["seq"],
                    "bytes": c.get("nbytes"),
                    "open s": round(float(c["age_s"]), 2),
                }
                for c in in_flight[:500]
            ],
            hide_index=True,
            width="stretch",
        )
        series = data.get("series", [])
        if not series:
            st.info("No collective traffic reported in this window.")
            return
        st.subheader("Mean duration (s)")
        st.altair_chart(charts.collective_lines(series, "mean_s", "mean s"), width="stretch")
        st.subheader("Max duration (s)")
        st.altair_chart(charts.collective_lines(series, "max_s", "max s"), width="stretch")
        st.subheader("Bus bandwidth (bytes/s, nccl-tests factors)")
        st.altair_chart(
            charts.collective_lines(series, "busbw_bytes_per_second", "busbw B/s"), width="stretch"
        )

    live(body)
