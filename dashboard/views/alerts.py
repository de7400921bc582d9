"""Alerts: firing, pending and resolved, each linked to the view with its evidence; silences
created and expired with the run's token."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlparse

import streamlit as st
from milepost.daemon.client import DaemonError
from milepost.dashboard import nav, source
from milepost.dashboard.views import live
from milepost.engine.contract.routes import ALERTS_PATH, SILENCES_PATH

STATUSES = ("firing", "pending", "resolved")


def target_view(alert: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The view (and query) an alert links to: its generator URL's path, else the overview."""
    url = urlparse(str(alert.get("generator_url") or alert.get("generatorURL") or ""))
    view = url.path.strip("/").split("/")[-1] if url.path.strip("/") else "overview"
    query = {k: v[0] for k, v in parse_qs(url.query).items() if v}
    return (view if view in nav.VIEWS else "overview"), query


def render() -> None:
    st.title("Alerts")

    def body() -> None:
        data = source.read("alerts", lambda c: source.raw("GET", ALERTS_PATH), None)
        source.banner()
        if data is None:
            if not st.session_state.get("down"):
                st.warning("alerts API not available on this daemon (no /api/v1/alerts)")
            return
        alerts = data.get("alerts", []) if isinstance(data, dict) else list(data)
        for status in STATUSES:
            group = [a for a in alerts if a.get("status") == status]
            st.subheader(f"{status.capitalize()}: {len(group)}")
            for a in group:
                labels = a.get("labels") or {}
                notes = a.get("annotations") or {}
                name = labels.get("alertname", "?")
                st.markdown(
                    f"**{name}** · {labels.get('severity', '')} · {notes.get('summary', '')}  \n"
                    f"<small>{', '.join(f'{k}={v}' for k, v in sorted(labels.items()))}</small>",
                    unsafe_allow_html=True,
                )
                view, query = target_view(a)  # a resolved alert's evidence matters in the post-mortem
                nav.link(view, f"open {view} for {name}", **query)

    live(body)
    silences()


def silences() -> None:
    st.subheader("Silences")
    data = source.read("silences", lambda c: source.raw("GET", SILENCES_PATH), None)
    if data is None:
        st.caption("silences API not available on this daemon")
        return
    items = data.get("silences", []) if isinstance(data, dict) else list(data)
    now = time.time()
    for s in items:
        active = float(s.get("starts_at", 0)) <= now < float(s.get("ends_at", 0))
        matchers = ", ".join(
            f"{m.get('name')}{m.get('op', '=')}{m.get('value')}" for m in s.get("matchers", [])
        )
        cols = st.columns([4, 1])
        cols[0].markdown(
            f"`{s.get('id')}` {matchers} until {source.fmt_ts(s.get('ends_at'))} "
            f"({'active' if active else 'expired'}) {s.get('comment', '')}"
        )
        if active and cols[1].button("expire", key=f"expire {s.get('id')}"):
            write("DELETE", f"{SILENCES_PATH}/{s.get('id')}", None)
    with st.form("new_silence"):
        matcher = st.text_input("matcher (name=value)", value="alertname=Straggler")
        minutes = st.number_input("minutes", min_value=1, max_value=10080, value=60)
        comment = st.text_input("comment", value="")
        if st.form_submit_button("create silence"):
            name, sep, value = matcher.partition("=")
            if not sep or not name.strip():
                st.error(f"matcher must be name=value, got {matcher!r}")
                return
            body = {
                "matchers": [{"name": name.strip(), "op": "=", "value": value.strip()}],
                "starts_at": now,
                "ends_at": now + float(minutes) * 60,
                "created_by": "dashboard",
                "comment": comment,
            }
            write("POST", SILENCES_PATH, body)


def write(method: str, path: str, body: dict[str, Any] | None) -> None:
    if not source.write_token():
        st.error("a token is needed: enter the run's token in the sidebar")
        return
    try:
        source.raw(method, path, body, write=True)
    except DaemonError as e:
        st.error(str(e))
        return
    st.success(f"{method} {path}: done")
