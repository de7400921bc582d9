"""One module per dashboard view, each with ``render()``; ``live`` runs a view's body as a fragment."""

from __future__ import annotations

import time
from collections.abc import Callable

import streamlit as st
from milepost.dashboard.source import settings

UPDATED = "updated"  # the caption each live body ends with (bench/dashboard.py reads it in the browser)


def live(body: Callable[[], None], every_s: float | None = None) -> None:
    """Runs ``body`` now and again every ``every_s`` (default: the refresh interval), in place
    (a fragment: no page reload). Each run ends with a caption: when it started (ms) and how
    long the script took.
    """

    def run() -> None:
        start = time.time()
        body()
        stamp = time.strftime("%H:%M:%S", time.localtime(start)) + f".{int(start * 1000) % 1000:03d}"
        st.caption(f"{UPDATED} {stamp} in {(time.time() - start) * 1000:.0f} ms")

    run.__qualname__ = f"live.{getattr(body, '__module__', '')}.{getattr(body, '__qualname__', 'body')}"
    st.fragment(run, run_every=every_s or settings().refresh_s)()
