"""The milepost dashboard (Streamlit): every view of a run, live, from the daemon's HTTP API.

    milepost dashboard --run-dir runs/NAME      (or --api http://HOST:PORT, --runs-root runs)

which runs ``streamlit run`` on this file. Views refresh in place through fragments; with
the daemon down they keep their last data under a banner and reconnect by themselves.
"""

from __future__ import annotations

import streamlit as st
from milepost.dashboard import nav, source

st.set_page_config(page_title="milepost", page_icon=":material/flag:", layout="wide")
page = st.navigation(nav.build_pages())
with st.sidebar:
    t = source.target()
    st.caption(f"run: {source.chosen_run_dir() or '-'}")
    st.caption(f"daemon: {t.url if t else '-'}")
    if not source.write_token():
        st.text_input("API token (for controls and silences)", type="password", key="token")
page.run()
