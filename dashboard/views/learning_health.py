"""Learning health: reward, loss, KL, gradient norm, clip fraction and learning rate per step."""

from __future__ import annotations

import streamlit as st
from milepost.dashboard import charts, source
from milepost.dashboard.views import live
from milepost.dashboard.views.overview import new_steps

FIELDS = ("reward_mean", "reward_std", "loss", "kl", "grad_norm", "clip_frac", "lr", "tokens_per_s")


def render() -> None:
    st.title("Learning health")

    def body() -> None:
        steps = new_steps()
        source.banner()
        if not steps:
            st.info("No steps yet.")
            return
        st.altair_chart(charts.curves(steps, FIELDS), width="content")
        nonfinite = [s["step"] for s in steps if any(s.get(k) is None for k in ("loss", "grad_norm"))]
        if nonfinite:
            st.warning(f"non-finite loss or gradient norm at steps {nonfinite[-10:]}")

    live(body)
