"""Controls: pause, resume, checkpoint now and stop, behind the run's token and a confirmation."""

from __future__ import annotations

import contextlib

import streamlit as st
from milepost.daemon.client import DaemonError
from milepost.dashboard import source
from milepost.dashboard.views import live
from milepost.engine.contract.enums import ControlAction

HELP = {
    ControlAction.PAUSE: "pause at the next step boundary",
    ControlAction.RESUME: "resume a paused run",
    ControlAction.CHECKPOINT: "checkpoint now",
    ControlAction.STOP: "checkpoint, then stop training (the daemon stays up)",
}


def render() -> None:
    st.title("Controls")

    def state() -> None:
        status = source.read("status", lambda c: c.status(), {})
        source.banner()
        st.metric("state", status.get("state", "-"))

    live(state)
    if not source.write_token():
        st.warning("Controls need the run's token: enter it in the sidebar (or set MILEPOST_TOKEN).")
        return
    cols = st.columns(len(HELP))
    for col, (action, text) in zip(cols, HELP.items(), strict=True):
        if col.button(action.value, help=text, key=f"ctl {action.value}"):
            st.session_state["confirm"] = action.value
    pending = st.session_state.get("confirm")
    if pending:
        st.warning(f"Really {pending} this run? {HELP[ControlAction(pending)]}.")
        yes, no = st.columns(2)
        if yes.button(f"confirm {pending}", type="primary", key="ctl confirm"):
            st.session_state.pop("confirm", None)
            w = source.writer()
            try:
                with contextlib.closing(w) if w else contextlib.nullcontext():
                    res = w.control(pending) if w else None
            except DaemonError as e:
                st.error(f"{pending}: {e}")
            else:
                st.success(f"{pending}: accepted; the run is now {res.get('state') if res else '?'}")
        if no.button("cancel", key="ctl cancel"):
            st.session_state.pop("confirm", None)
            st.rerun()
