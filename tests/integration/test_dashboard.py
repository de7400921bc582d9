"""The dashboard against a live daemon fed by a short real run (real Ray, real gloo ranks).

One run serves the whole module: two trainer ranks, trainer 1 freezes itself (SIGSTOP, an
injected hang), the daemon diagnoses it, collects stacks, restarts from a checkpoint and verifies the
resume; the run then keeps training while the tests look at it.

- AppTest: each view's script against that daemon, asserting the elements an on-call
  engineer reads (the incident's culprit, the restart count, the verified resume, ...);
- a browser test: ``milepost dashboard`` (real Streamlit) in Debian's Chromium through
  Playwright opens every view, sees a new step arrive without a reload, and saves
  screenshots under ``test-artifacts/dashboard/``;
- the daemon down (killed) and back: a banner, the last data kept, then recovery by itself.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import REPO
from tests.harness import DaemonRun, e2e_job
from tests.servers import free_port

# The first test carries the shared run's start-up (minutes on a loaded 2-core machine).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ARTIFACTS = REPO / "test-artifacts" / "dashboard"
CHROMIUM = "/usr/bin/chromium"
APP_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonRun]:
    tmp = tmp_path_factory.mktemp("dashboard")
    doc = e2e_job(
        "dashboard",
        seed=21,
        steps=5000,  # outlives the module; cleanup ends it
        supervisor={"startup_grace_s": 120.0},
    )
    r = DaemonRun(tmp, doc)
    env = {
        "MILEPOST_DASHBOARD_RUN_DIR": str(r.run_dir),
        "MILEPOST_DASHBOARD_RUNS_ROOT": str(tmp),
        "MILEPOST_DASHBOARD_REFRESH_S": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = r.start()
        r.wait_step(3, timeout=240)  # Ray's start may time out once on a busy machine: the daemon retries
        standby = r.run_dir / "attempts" / "standby_1" / "ready"
        # The hang goes in once the warm standby is up where it comes up in time: a cold restart on a
        # loaded machine takes minutes, and the restart is what the Incidents view shows.
        with contextlib.suppress(AssertionError):
            r.wait("the warm standby", standby.exists, 180)
        client.inject("hang", rank=1)
        r.wait(
            "a verified resume", lambda: [e for e in r.events("resume_verified") if e["attempt"] >= 1], 300
        )
        r.wait("the diagnosis's stacks", lambda: [d for d in r.client().diagnoses() if d.get("evidence")], 60)
        r.wait_step(r.status()["step"] + 2, timeout=60)
        yield r
    finally:
        r.cleanup()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _view(view: str) -> None:
    from milepost.dashboard import nav

    nav.renderer(view)()


def app(view: str) -> AppTest:
    at = AppTest.from_function(_view, args=(view,), default_timeout=APP_TIMEOUT_S).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    return next(str(m.value) for m in at.metric if m.label == label)


def table(at: AppTest, column: str) -> Any:
    """The first dataframe with ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def charts(at: AppTest) -> int:
    return len(at.get("vega_lite_chart"))


# -- AppTest: each view ----------------------------------------------------------------
def test_runs_lists_the_run_with_its_state(run: DaemonRun) -> None:
    at = app("runs")
    table = at.dataframe[0].value
    row = table[table["run"] == "run"].iloc[0]
    assert row["state"] in ("RUNNING", "RECOVERING") and row["restarts"] >= 1 and row["step"] > 6
    assert at.selectbox(key="run_pick").value == "run"


def test_overview_shows_state_progress_goodput_and_curves(run: DaemonRun) -> None:
    at = app("overview")
    assert metric(at, "state") in ("RUNNING", "RECOVERING")
    step, target = metric(at, "step").split(" / ")
    assert int(step) > 6 and target == "5000"
    assert int(metric(at, "restarts")) >= 1 and metric(at, "goodput").endswith("%")
    assert charts(at) >= 2  # goodput buckets and the learning curves
    assert len(at.dataframe[0].value) > 0  # the last events
    assert not at.error


def test_ranks_shows_every_trainer_with_its_compute_history(run: DaemonRun) -> None:
    at = app("ranks")
    assert metric(at, "ranks") == "2" and metric(at, "ranks reporting") == "2"
    assert charts(at) == 2  # the all-ranks band and the page's heatmap
    scores = table(at, "straggler score")
    assert sorted(scores["rank"]) == [0, 1] and scores["straggler score"].notna().all()
    now = table(at, "heartbeat age s")
    assert sorted(now["rank"]) == [0, 1] and (now["heartbeat age s"] < 10).all()


def test_collectives_shows_durations_and_busbw(run: DaemonRun) -> None:
    at = app("collectives")
    assert any(s.value.startswith("In flight now") for s in at.subheader)
    assert charts(at) == 3  # mean, max, busbw


def test_incidents_names_the_frozen_rank_and_its_recovery(run: DaemonRun) -> None:
    at = app("incidents")
    table = at.dataframe[0].value
    hang = table[table["kind"] == "frozen_rank"].iloc[0]
    assert hang["culprits"] == "trainer 1" and hang["op"]
    assert any(s.value.startswith("Diagnosis") for s in at.subheader)
    assert charts(at) == 1  # the recovery timeline
    assert {e.label for e in at.expander} >= {"trainer0", "trainer1"}  # py-spy stacks of every rank
    assert any("py-spy" in c.value or "Thread" in c.value for c in at.code)


def test_checkpoints_shows_commits_and_the_verified_resume(run: DaemonRun) -> None:
    at = app("checkpoints")
    assert int(metric(at, "checkpoints")) >= 2 and int(metric(at, "verified resumes")) >= 1
    assert charts(at) == 2  # timeline and save stall
    assert (at.dataframe[0].value["MiB"] > 0).any()


def test_alerts_view_lists_alerts_or_says_the_api_is_missing(run: DaemonRun) -> None:
    at = app("alerts")
    has_api = httpx.get(run.client().url + "/api/v1/alerts", timeout=5).status_code != 404
    if has_api:
        assert [s.value.split(":")[0] for s in at.subheader][:3] == ["Firing", "Pending", "Resolved"]
    else:
        assert any("alerts API not available" in w.value for w in at.warning)


def test_traces_draws_a_step_waterfall(run: DaemonRun) -> None:
    at = app("traces")
    assert any(s.value.startswith("Step ") for s in at.subheader), [s.value for s in at.subheader]
    assert charts(at) == 1 and len(at.dataframe[0].value) >= 3


def test_events_filter_by_kind_and_role(run: DaemonRun) -> None:
    at = app("events")
    at.selectbox(key="ev_kind").set_value("resume_verified").run()
    kinds = at.dataframe[0].value["kind"]
    assert len(kinds) >= 1 and set(kinds) == {"resume_verified"}
    at.selectbox(key="ev_kind").set_value("any")
    at.selectbox(key="ev_role").set_value("daemon").run()
    assert set(at.dataframe[0].value["role"]) == {"daemon"}


def test_learning_health_draws_the_curves(run: DaemonRun) -> None:
    assert charts(app("learning_health")) == 1


def test_controls_need_a_confirmation(run: DaemonRun) -> None:
    before = len(run.events("control_checkpoint"))
    at = app("controls")
    at.button(key="ctl checkpoint").click().run()
    assert any("Really checkpoint" in w.value for w in at.warning)
    assert len(run.events("control_checkpoint")) == before  # nothing sent before the confirmation
    at.button(key="ctl confirm").click().run()
    assert any("accepted" in s.value for s in at.success), [e.value for e in at.error]
    assert len(run.events("control_checkpoint")) == before + 1


# -- the browser -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dashboard(run: DaemonRun) -> Iterator[str]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium")
    port = free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = (ARTIFACTS / "streamlit.log").open("wb")
    cmd = [sys.executable, "-m", "milepost.daemon.cli", "dashboard", "--run-dir", str(run.run_dir)]
    cmd += ["--runs-root", str(run.run_dir.parent), "--port", str(port), "--refresh-s", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        run.wait("streamlit's health check", lambda: _healthy(url), 60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/_stcore/health", timeout=2).text == "ok"
    return False


@pytest.fixture(scope="module")
def page(dashboard: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(45_000)
        yield pg
        browser.close()


# view -> a text the view shows when its data arrived
KEY_TEXT = {
    "overview": "Learning and throughput",
    "ranks": "Compute time per rank",
    "collectives": "In flight now",
    "incidents": "Recovery timeline",
    "checkpoints": "Verification and resumes",
    "alerts": "Silences",
    "traces": "spans",
    "events": "of the newest",
    "learning_health": "Learning health",
    "controls": "pause",
}
CHARTS = {"overview", "ranks", "collectives", "incidents", "checkpoints", "traces", "learning_health"}


def test_browser_opens_every_view(dashboard: str, page: Any) -> None:
    page.goto(dashboard)
    page.get_by_role("heading", name="Runs").wait_for()
    page.get_by_role("button", name="Open overview").wait_for()
    page.screenshot(path=str(ARTIFACTS / "runs.png"), full_page=True)
    for view, text in KEY_TEXT.items():
        page.goto(f"{dashboard}/{view}")
        page.get_by_text(text, exact=False).filter(visible=True).first.wait_for()
        if view in CHARTS:
            chart = page.locator('[data-testid="stVegaLiteChart"]').first
            chart.scroll_into_view_if_needed()  # Streamlit draws a chart when it comes into view
            chart.locator("canvas, svg").first.wait_for()
        assert page.locator('[data-testid="stException"]').count() == 0, f"{view} raised"
        page.screenshot(path=str(ARTIFACTS / f"{view}.png"), full_page=True)
    page.goto(f"{dashboard}/incidents")
    # A data frame's cells are hidden DOM over its canvas: wait for the visible text (the markdown).
    page.get_by_text("frozen_rank").filter(visible=True).first.wait_for()
    page.get_by_text("trainer 1").filter(visible=True).first.wait_for()


def test_browser_sees_new_steps_without_a_reload(dashboard: str, page: Any) -> None:
    page.goto(f"{dashboard}/overview")
    step = page.locator('[data-testid="stMetric"]', has_text="step").locator('[data-testid="stMetricValue"]')
    step.wait_for()
    first = step.inner_text()
    page.evaluate("window.__milepost_marker = 1")  # a reload would drop it
    deadline = time.monotonic() + 45
    while step.inner_text() == first:
        assert time.monotonic() < deadline, f"the step stayed at {first}"
        page.wait_for_timeout(250)
    assert page.evaluate("window.__milepost_marker") == 1
    page.screenshot(path=str(ARTIFACTS / "overview-live.png"), full_page=True)


def test_browser_clicks_from_a_firing_alert_to_its_incident(
    run: DaemonRun, dashboard: str, page: Any
) -> None:
    resp = httpx.get(run.client().url + "/api/v1/alerts", timeout=5)
    if resp.status_code == 404:
        pytest.skip("this branch's daemon has no /api/v1/alerts yet (issue 12's alerts API)")
    linked = [a for a in resp.json().get("alerts", []) if "incidents" in str(a.get("generator_url", ""))]
    # The hang's alert resolves once the next attempt launches: a firing one when the test is in
    # time for it, else the same alert resolved (the view links both to their incident).
    linked.sort(key=lambda a: a.get("status") != "firing")
    assert linked, f"no alert links to an incident: {resp.json()}"
    name = linked[0]["labels"]["alertname"]
    page.goto(f"{dashboard}/alerts")
    page.get_by_text(f"open incidents for {name}").filter(visible=True).first.click()
    page.wait_for_url("**/incidents**")
    page.get_by_text("Recovery timeline").filter(visible=True).first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "alert-to-incident.png"), full_page=True)


# -- the daemon down, then back ----------------------------------------------------------
def test_daemon_down_keeps_the_last_data_under_a_banner_then_reconnects(run: DaemonRun) -> None:
    at = app("overview")
    step_before = metric(at, "step")
    assert not at.error
    run.kill_daemon()
    at.run()
    assert any("Daemon unreachable" in e.value for e in at.error)
    assert metric(at, "step") == step_before and metric(at, "state") in ("RUNNING", "RECOVERING")
    run.start()  # a new daemon re-attaches to the running attempt, on the same port
    deadline = time.monotonic() + 60
    while True:
        at.run()
        if not at.error:
            break
        assert time.monotonic() < deadline, [e.value for e in at.error]
        time.sleep(1)
    assert int(metric(at, "step").split(" / ")[0]) >= int(step_before.split(" / ")[0])
