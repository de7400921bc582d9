"""Run state transitions under races: an API `stop` against the supervisor ending the run, and
against a launch. Each test forces the interleaving that lost the stop (or the success) before."""

from __future__ import annotations

import threading
import types
from pathlib import Path
from typing import Any

import pytest
from milepost.daemon.store import Store
from milepost.daemon.supervisor import Supervisor
from milepost.engine.contract.config import OpsView
from milepost.engine.contract.enums import RunState

pytestmark = pytest.mark.timeout(30)


class PausingStore(Store):
    """A store whose ``run()`` can hand control to a hook once, between a caller's read and its write."""

    hook: Any = None

    def run(self) -> dict[str, Any] | None:
        row = super().run()
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return row


def _supervisor(run_dir: Path, state: RunState) -> tuple[Supervisor, PausingStore]:
    store = PausingStore(run_dir)
    store.ensure_run(run_id="r", name="t", job="job.toml", run_dir=str(run_dir), target_steps=10)
    store.set_run_state(state)
    sup = Supervisor(
        job="job.toml", run_dir=run_dir, ops=OpsView(), store=store, token="t", api_url="http://x"
    )
    return sup, store


def test_a_stop_racing_the_runs_success_never_turns_succeeded_into_stopping(tmp_path: Path) -> None:
    sup, store = _supervisor(tmp_path, RunState.RUNNING)
    finished = threading.Event()

    def finish() -> None:
        sup._finish(RunState.SUCCEEDED, "reached the target step")
        finished.set()

    def success_lands_now() -> None:
        # The stop has read RUNNING; the supervisor ends the run from its own thread meanwhile.
        threading.Thread(target=finish, daemon=True).start()
        finished.wait(2.0)  # with the lock held by the stop, the success waits for it instead

    store.hook = success_lands_now
    outcome: dict[str, Any] = {}
    try:
        outcome["result"] = sup.controller.control("stop")
    except ValueError as e:
        outcome["refused"] = str(e)
    assert finished.wait(10)
    try:
        assert (store.run() or {})["state"] == RunState.SUCCEEDED, outcome
    finally:
        sup.shutdown()
        store.close()


def test_a_stop_landing_as_the_next_attempt_launches_is_not_lost(tmp_path: Path) -> None:
    sup, store = _supervisor(tmp_path, RunState.RECOVERING)
    sup.attempt.number, sup.next_launch_at = 0, 0.0  # attempt 0 ended; its restart is due
    spawned: list[int] = []

    def spawn(n: int) -> Any:
        spawned.append(n)
        return types.SimpleNamespace(pid=2**22 + 1)  # no such process: nothing runs

    sup.launcher.spawn = spawn  # type: ignore[method-assign]
    stop_result: dict[str, Any] = {}

    def stop_lands_now() -> None:
        # The tick has read RECOVERING; the API's stop is taken on another thread before the launch.
        t = threading.Thread(target=lambda: stop_result.update(sup.controller.control("stop")))
        t.start()
        t.join(10)

    store.hook = stop_lands_now
    try:
        sup.tick()
        assert stop_result.get("accepted") is True
        assert spawned == [] and (store.run() or {})["state"] == RunState.STOPPED
    finally:
        sup.shutdown()
        store.close()
