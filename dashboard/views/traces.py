"""Traces: one step's spans across the driver and the ranks, as a waterfall."""

from __future__ import annotations

import streamlit as st
from milepost.dashboard import charts, source
from milepost.dashboard.views import live


def render() -> None:
    st.title("Traces")
    wanted = st.number_input(
        "step (0: the newest traced step)", min_value=0, value=0, step=1, key="trace_step"
    )

    def body() -> None:
        traces = source.read("traces", lambda c: c.traces(limit=200), [])
        source.banner()
        stepped = sorted({int(t["step"]) for t in traces if t.get("step") is not None})
        if not stepped:
            st.info("No step traces held (tracing off, or no step finished yet).")
            return
        # Ranks export their spans in batches (every few seconds): the newest steps can still lack
        # theirs. By default show the newest step with at least the typical span count.
        counts: dict[int, int] = {}
        for t in traces:
            if t.get("step") is not None:
                counts[int(t["step"])] = max(counts.get(int(t["step"]), 0), int(t.get("span_count") or 0))
        typical = sorted(counts.values())[len(counts) // 2]
        step = int(wanted) or [n for n in stepped if counts[n] >= typical][-1]
        st.caption(f"traced steps held: {stepped[0]}..{stepped[-1]} ({len(stepped)})")
        trace = source.read(f"trace {step}", lambda c: c.step_trace(step), {})
        spans = trace.get("spans") or []
        if not spans:
            st.warning(f"no spans of step {step} are held")
            return
        st.subheader(f"Step {step}: trace {trace.get('trace_id')}, {len(spans)} spans")
        st.altair_chart(charts.waterfall(spans), width="stretch")
        st.dataframe(
            [
                {
                    "span": s["name"],
                    "process": (s.get("resource") or {}).get("service.instance.id"),
                    "ms": round(float(s["duration_s"]) * 1000, 2),
                    "status": s.get("status"),
                }
                for s in sorted(spans, key=lambda s: float(s["start_ts"]))
            ],
            hide_index=True,
            width="stretch",
        )

    live(body)
