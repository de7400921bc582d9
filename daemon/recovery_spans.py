"""The daemon's own span per recovery: from the end of a failed attempt to the first step of the next.

The engine traces a recovery from the inside (the new attempt's ``recovery`` span: resume,
checkpoint load, weight sync); this span is the operator's view of the whole outage,
detection to progress, with the cause, the restart delay and the step resumed from. It
goes into the daemon's trace ring like any rank's span (and is forwarded with them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from milepost.engine.contract.enums import Role
from milepost.engine.contract.events import EventKind

from .otlp_receiver import PROTOBUF, TraceReceiver

log = logging.getLogger(__name__)

_RUN_ENDED = (EventKind.RUN_FAILED, EventKind.RUN_STOPPED, EventKind.RUN_SUCCEEDED)


def _ns(ts: Any) -> int:
    try:
        return int(float(ts) * 1e9)
    except (TypeError, ValueError):
        return time.time_ns()


class _ToReceiver:
    """A span exporter that hands spans to the daemon's receiver, encoded as OTLP."""

    def __init__(self, receiver: TraceReceiver) -> None:
        self.receiver = receiver

    def export(self, spans: Any) -> Any:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.receiver.ingest(encode_spans(spans).SerializeToString(), PROTOBUF)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class RecoveryTracer:
    """Fed the run's events and step records (a subscriber of the daemon's event bus)."""

    def __init__(self, receiver: TraceReceiver, run_id: Callable[[], str]) -> None:
        self.receiver, self.run_id = receiver, run_id
        self._tracer: Any = None
        self._span: Any = None
        self._failed_attempt = -1

    def _get_tracer(self) -> Any:
        if self._tracer is None:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor

            resource = Resource.create(
                {
                    "service.name": "milepost",
                    "service.instance.id": Role.DAEMON.value,
                    "milepost.run": self.run_id(),
                    "milepost.role": Role.DAEMON.value,
                    "milepost.rank": 0,
                }
            )
            provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            provider.add_span_processor(SimpleSpanProcessor(_ToReceiver(self.receiver)))  # type: ignore[arg-type]
            self._tracer = provider.get_tracer("milepost.daemon")
        return self._tracer

    def on_event(self, ev: dict[str, Any], restart_reason: str = "") -> None:
        kind, data = ev.get("kind"), ev.get("data") or {}
        span = self._span
        if kind == EventKind.ATTEMPT_ENDED and span is None:
            self._failed_attempt = int(ev.get("attempt") or 0)
            self._span = self._get_tracer().start_span(
                "recovery",
                start_time=_ns(ev.get("ts", time.time())),
                attributes={
                    "milepost.attempt": self._failed_attempt,
                    "milepost.failure": str(ev.get("message", ""))[:256],
                },
            )
        elif span is None:
            return
        elif kind == EventKind.RESTART_SCHEDULED:
            span.set_attribute("milepost.restart.reason", restart_reason or "other")
            span.set_attribute("milepost.restart.delay_s", float(data.get("delay_s", 0.0) or 0.0))
            span.add_event(EventKind.RESTART_SCHEDULED.value, timestamp=_ns(ev.get("ts", time.time())))
        elif kind == EventKind.ATTEMPT_LAUNCHED:
            span.set_attribute("milepost.next_attempt", int(ev.get("attempt") or 0))
            span.add_event(EventKind.ATTEMPT_LAUNCHED.value, timestamp=_ns(ev.get("ts", time.time())))
        elif kind == EventKind.RESUME_VERIFIED:
            span.set_attribute("milepost.resumed_from", int(ev.get("step") or 0))
            span.add_event(EventKind.RESUME_VERIFIED.value, timestamp=_ns(ev.get("ts", time.time())))
        elif kind in _RUN_ENDED:
            from opentelemetry.trace import Status, StatusCode

            if kind == EventKind.RUN_FAILED:
                span.set_status(Status(StatusCode.ERROR, str(ev.get("message", ""))[:256]))
            span.end(end_time=_ns(ev.get("ts", time.time())))
            self._span = None

    def on_step(self, rec: dict[str, Any]) -> None:
        if self._span is not None and int(rec.get("attempt") or 0) > self._failed_attempt:
            self._span.set_attribute("milepost.first_step", int(rec.get("step", 0)))
            self._span.end(end_time=_ns(rec.get("ts", time.time())))
            self._span = None
