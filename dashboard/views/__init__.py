"""One module per dashboard view, each with ``render()``; ``live`` runs a view's body as a fragment."""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st
from milepost.dashboard.source import settings


def live(body: Callable[[], None]) -> None:
    """Runs ``body`` now and again every refresh interval, in place (a fragment: no page reload)."""
    st.fragment(body, run_every=settings().refresh_s)()
