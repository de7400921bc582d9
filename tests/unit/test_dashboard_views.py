"""Dashboard views (Streamlit AppTest) at the edges: 1 rank, 1024 ranks, and no daemon at all.

The API is the real app over a real Store on a real uvicorn server; the controller is the
tests' fake (tests/servers.FakeController) and the 1024 ranks are synthetic compute times
fed to the API's view history. The views against a live run are tests/integration/test_dashboard.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from milepost.daemon.api import create_app
from milepost.daemon.store import Store
from streamlit.testing.v1 import AppTest

from tests.servers import FakeController, serve

pytestmark = pytest.mark.timeout(120)


def _view(view: str) -> None:
    from milepost.dashboard import nav

    nav.renderer(view)()


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Path]]:
    run_dir = tmp_path / "run"
    store = Store(run_dir)
    app = create_app(store, FakeController(store), token="tok", require_token_for_reads=False)
    with serve(app) as url:
        (run_dir / "daemon.json").write_text(json.dumps({"url": url, "pid": 1}))
        (run_dir / "token").write_text("tok")
        monkeypatch.setenv("MILEPOST_DASHBOARD_RUN_DIR", str(run_dir))
        monkeypatch.setenv("MILEPOST_DASHBOARD_RUNS_ROOT", str(tmp_path))
        yield app.state.view_history, run_dir
    store.close()


def ranks_view(**widgets: Any) -> AppTest:
    at = AppTest.from_function(_view, args=("ranks",), default_timeout=60).run()
    for key, value in widgets.items():
        at.selectbox(key=key).set_value(value) if key != "ranks_page" else at.number_input(key=key).set_value(
            value
        )
    if widgets:
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    return next(str(m.value) for m in at.metric if m.label == label)


def test_ranks_view_at_1024_ranks_pages_and_sorts_the_slowest_first(daemon: tuple[Any, Path]) -> None:
    history, _ = daemon
    for r in range(1024):
        for s in range(1, 201):
            history.add_compute("trainer", r, s, 0.65 if r == 777 else 0.5)
    at = ranks_view()
    assert metric(at, "ranks") == "1024" and metric(at, "worst straggler score") == "1.30"
    page = next(d.value for d in at.dataframe if "straggler score" in d.value.columns)
    assert len(page) == 64 and page["rank"].iloc[0] == 777  # sorted by score: the straggler on top
    at = ranks_view(ranks_sort="rank", ranks_page=3)
    page = next(d.value for d in at.dataframe if "straggler score" in d.value.columns)
    assert list(page["rank"]) == list(range(128, 192))


def test_ranks_view_with_one_rank(daemon: tuple[Any, Path]) -> None:
    history, _ = daemon
    for s in range(1, 11):
        history.add_compute("trainer", 0, s, 0.1)
    at = ranks_view()
    assert metric(at, "ranks") == "1" and len(at.get("vega_lite_chart")) == 2


def test_without_a_daemon_every_view_says_so_and_none_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from milepost.dashboard.nav import VIEWS

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setenv("MILEPOST_DASHBOARD_RUN_DIR", str(run_dir))  # no daemon.json: never started
    monkeypatch.setenv("MILEPOST_DASHBOARD_RUNS_ROOT", str(tmp_path))
    for view in VIEWS:
        at = AppTest.from_function(_view, args=(view,), default_timeout=60).run()
        assert not at.exception, (view, [e.value for e in at.exception])
        if view != "runs":
            assert any("Daemon unreachable" in e.value for e in at.error), view


def test_the_daemons_dashboard_child_serves_then_stops(daemon: tuple[Any, Path]) -> None:
    """What `milepost run --dashboard` (make run) does: start the dashboard beside the daemon, stop it with it."""
    import time

    import httpx
    from milepost.daemon import dashboard_proc

    from tests.servers import free_port

    _, run_dir = daemon
    proc, url = dashboard_proc.start(run_dir, free_port())
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (run_dir / "dashboard.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/_stcore/health", timeout=2).text == "ok":
                    break
            assert time.monotonic() < deadline, "the dashboard did not come up in 60 s"
            time.sleep(0.3)
    finally:
        dashboard_proc.stop(proc)
    assert proc.returncode is not None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/_stcore/health", timeout=2)
