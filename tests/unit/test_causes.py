"""The restart-cause classifier: a pure fold over the run's events."""

from __future__ import annotations

from typing import Any

from milepost.daemon.causes import Causes, classify, restart_reason


def fold(*events: dict[str, Any]) -> list[str]:
    state, reasons = Causes(), []
    for ev in events:
        state, reason = classify(state, ev)
        if reason is not None:
            reasons.append(reason)
    return reasons


def test_a_detection_names_the_cause_when_the_daemon_kills() -> None:
    assert fold({"kind": "HeartbeatLost"}, {"kind": "attempt_killed"}, {"kind": "restart_scheduled"}) == [
        "heartbeat_lost"
    ]
    assert fold({"kind": "collective_hang"}, {"kind": "attempt_killed"}, {"kind": "restart_scheduled"}) == [
        "collective_hang"
    ]
    # An older daemon's spelling, still in its store.
    assert fold({"kind": "CollectiveHang"}, {"kind": "attempt_killed"}, {"kind": "restart_scheduled"}) == [
        "collective_hang"
    ]


def test_the_attempts_own_word_and_its_absence() -> None:
    failed = {"kind": "attempt_failed", "data": {"cause": "actor_error"}}
    assert fold({"kind": "straggler"}, failed, {"kind": "attempt_ended"}, {"kind": "restart_scheduled"}) == [
        "actor_error"
    ]
    ended = {"kind": "attempt_ended", "data": {"cause": {"cause": "driver_error"}}}
    assert fold(ended, {"kind": "restart_scheduled"}) == ["driver_error"]
    gone = {"kind": "attempt_ended", "message": "attempt 3 (pid) vanished without a word (killed?)"}
    assert fold(gone, {"kind": "restart_scheduled"}) == ["vanished"]
    assert fold({"kind": "attempt_ended"}, {"kind": "restart_scheduled"}) == ["other"]


def test_each_attempt_starts_afresh() -> None:
    died = {"kind": "attempt_failed", "data": {"cause": "actor_died"}}
    restart = {"kind": "restart_scheduled"}
    launched = {"kind": "attempt_launched", "attempt": 1}
    assert fold(died, restart, launched, {"kind": "attempt_ended"}, restart) == ["actor_died", "other"]
    # The first word stands: a later failure in the same attempt does not overwrite it.
    assert fold(died, {"kind": "attempt_failed", "data": {"cause": "actor_error"}}, restart) == ["actor_died"]


def test_labels_are_bounded() -> None:
    assert restart_reason("HangDetected") == "collective_hang"
    assert restart_reason("something new") == "other"
    assert restart_reason("insufficient_slots") == "insufficient_slots"
