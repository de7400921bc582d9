"""Why an attempt ended, as the ``reason`` label of ``milepost_restarts_total`` (pure logic).

The run's events are folded one by one into ``Causes`` (``classify``); a
``restart_scheduled`` event yields the restart's reason and starts the next attempt's
account afresh. The rules:

- a daemon detection (``heartbeat_lost``, ``progress_stalled``, a hang) is remembered, and
  becomes the cause when the daemon then kills the attempt (``attempt_killed``);
- otherwise the attempt's own word: ``attempt_failed`` data ``cause``, or the cause that
  ``attempt_ended`` carries; an attempt that vanished without a word is ``vanished``;
- a ``straggler`` event alone ends nothing and so names no cause;
- a cause outside ``RESTART_REASONS`` is ``other`` (a bounded label set).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from milepost.engine.contract.events import EventKind

RESTART_REASONS = (
    "actor_died",
    "actor_error",
    "driver_error",
    "heartbeat_lost",
    "progress_stalled",
    "collective_hang",
    "straggler",
    "insufficient_slots",
    "vanished",
    "other",
)
# "hang_detected" and the CamelCase "CollectiveHang" are older daemons' spellings, still in their stores.
HANG_KINDS = (EventKind.COLLECTIVE_HANG, "hang_detected")
# Daemon detections that end an attempt (event kinds, snake_cased); a straggler event alone does not.
DETECTIONS = (EventKind.HEARTBEAT_LOST, EventKind.PROGRESS_STALLED, *HANG_KINDS)


def snake(kind: str) -> str:
    """``CollectiveHang`` (an older daemon's spelling) -> ``collective_hang``; snake_case stays as it is."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


@dataclass(frozen=True)
class Causes:
    """What is known of the current attempt's end so far."""

    cause: str = ""  # why the attempt ended
    detected: str = ""  # the daemon's newest detection in this attempt


def restart_reason(cause: str) -> str:
    """The bounded label for a cause."""
    c = snake(cause)
    if c in HANG_KINDS:
        return EventKind.COLLECTIVE_HANG.value
    return c if c in RESTART_REASONS else "other"


def classify(state: Causes, ev: dict[str, Any]) -> tuple[Causes, str | None]:
    """The state after ``ev``, and for a ``restart_scheduled`` event the restart's reason."""
    kind = str(ev.get("kind", ""))
    kind_snake = snake(kind)
    data = ev.get("data") or {}
    if kind == EventKind.ATTEMPT_LAUNCHED and ev.get("attempt") is not None:
        return Causes(), None
    if kind_snake in DETECTIONS:
        return Causes(
            state.cause, EventKind.COLLECTIVE_HANG.value if kind_snake in HANG_KINDS else kind_snake
        ), None
    if kind == EventKind.ATTEMPT_KILLED:
        # The daemon ended the attempt: the cause is what it detected just before.
        return Causes(state.detected or state.cause, state.detected), None
    if kind == EventKind.ATTEMPT_FAILED:
        return Causes(state.cause or str(data.get("cause", "")), state.detected), None
    if kind == EventKind.ATTEMPT_ENDED:
        cause = state.cause
        said = data.get("cause")
        if isinstance(said, dict) and not cause:
            cause = str(said.get("cause", ""))
        if not cause and "vanished" in str(ev.get("message", "")):
            cause = "vanished"
        return Causes(cause, state.detected), None
    if kind == EventKind.RESTART_SCHEDULED:
        return Causes(), restart_reason(state.cause)
    return state, None
