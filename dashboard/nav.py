"""The dashboard's pages: each view's URL path, title and render function, and links between them.

URL paths are the view names alerts put in their links (``alerts.catalog``: overview, ranks,
incidents, checkpoints, events, learning_health), so an alert opens the page with its evidence.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import streamlit as st
from streamlit.errors import StreamlitAPIException

# url path -> (title, icon); the module milepost.dashboard.views.<path> renders it.
VIEWS: dict[str, tuple[str, str]] = {
    "runs": ("Runs", ":material/list:"),
    "overview": ("Overview", ":material/monitoring:"),
    "ranks": ("Ranks", ":material/grid_on:"),
    "collectives": ("Collectives", ":material/hub:"),
    "incidents": ("Incidents", ":material/emergency:"),
    "checkpoints": ("Checkpoints", ":material/save:"),
    "alerts": ("Alerts", ":material/notifications:"),
    "traces": ("Traces", ":material/timeline:"),
    "events": ("Events", ":material/receipt_long:"),
    "learning_health": ("Learning health", ":material/school:"),
    "controls": ("Controls", ":material/tune:"),
}
PAGES: dict[str, Any] = {}  # url path -> StreamlitPage, filled by the app (empty in a one-view test)


def renderer(view: str) -> Callable[[], None]:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    render: Callable[[], None] = importlib.import_module(f"milepost.dashboard.views.{view}").render
    return render


def build_pages() -> list[Any]:
    """One st.Page per view; Runs is the default page (served at /), the rest at /<view>."""
    PAGES.clear()
    for i, (view, (title, icon)) in enumerate(VIEWS.items()):
        fn = renderer(view)
        PAGES[view] = st.Page(fn, title=title, icon=icon, url_path=view, default=i == 0)
    return list(PAGES.values())


def link(view: str, label: str, **query: str) -> None:
    """A link to another view (same session, no reload); a plain URL where pages are not registered."""
    if view in PAGES:
        try:
            st.page_link(PAGES[view], label=label, query_params=query or None)
            return
        except StreamlitAPIException:
            pass
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    st.markdown(f"[{label}](/{view}{'?' + qs if qs else ''})")


def go(view: str) -> None:
    """Switches to ``view`` when pages are registered (the app), else does nothing (a one-view test)."""
    if view in PAGES:
        st.switch_page(PAGES[view])
