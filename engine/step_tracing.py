"""OpenTelemetry tracing for every process of an attempt: one step is one trace across processes.

The driver opens a ``step`` span and a span per phase (rollout, reward, train,
weight_sync, checkpoint) and a ``recovery``/``resume`` span around the resume; the
actors' traced methods (``traced_actor``) open their span as a child of the driver's,
from a W3C ``traceparent`` carrier passed as the ``carrier`` keyword of the remote call.

Spans go by OTLP/HTTP to the daemon's ``/v1/traces`` (with the run's token) when the
process has a daemon; without one, to ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` if set;
otherwise tracing is off. The standard variables are honoured: ``OTEL_SDK_DISABLED``,
``OTEL_TRACES_EXPORTER=none``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_PROPAGATORS``, ``OTEL_BSP_*`` and the exporter's
``OTEL_EXPORTER_OTLP_*`` settings; ``MILEPOST_TRACING=0`` turns tracing off too.
Disabled, every call here is a constant-time no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .contract.process import RUN_ID_ENV, TRACING_ENV
from .contract.routes import OTLP_TRACES_PATH

log = logging.getLogger(__name__)

SERVICE = "milepost"

# Traced actor methods: method -> (span name, attribute for the first positional argument).
TRAINER_METHODS: dict[str, tuple[str, str | None]] = {
    "train_step": ("trainer.train_step", "milepost.step"),
    "export_weights": ("trainer.export_weights", "milepost.weight_version"),
    "save_checkpoint": ("trainer.save_checkpoint", "milepost.step"),
    "load_checkpoint": ("trainer.load_checkpoint", "milepost.checkpoint.path"),
}
ROLLOUT_METHODS: dict[str, tuple[str, str | None]] = {
    "generate": ("rollout.generate", "milepost.step"),
    "update_weights": ("rollout.update_weights", None),
}
_TRACED = frozenset(TRAINER_METHODS) | frozenset(ROLLOUT_METHODS)
_NULL = contextlib.nullcontext()
T = TypeVar("T")


def _off(env: Mapping[str, str]) -> bool:
    return (
        env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        or env.get(TRACING_ENV, "").strip().lower() in ("0", "false", "off", "no")
        or env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none"
    )


class Tracing:
    """A process's tracer. Without a provider (tracing off) every method is a no-op."""

    def __init__(self, provider: Any = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("milepost") if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(
        self, name: str, attributes: dict[str, Any] | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        """A child of the current span (a root when there is none); yields the span or None."""
        if self._tracer is None:
            return _NULL
        return self._tracer.start_as_current_span(name, attributes=attributes)

    def remote_span(
        self, name: str, carrier: Mapping[str, str] | None, attributes: dict[str, Any] | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        """A span whose parent is the one a W3C carrier names (from another process)."""
        if self._tracer is None:
            return _NULL
        from opentelemetry.propagate import extract

        ctx = extract(dict(carrier)) if carrier else None
        return self._tracer.start_as_current_span(name, context=ctx, attributes=attributes)

    def carrier(self) -> dict[str, str] | None:
        """The current span as a W3C carrier (``traceparent``), or None when off."""
        if self._tracer is None:
            return None
        from opentelemetry.propagate import inject

        out: dict[str, str] = {}
        inject(out)
        return out

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flushes what is queued (bounded by ``timeout_s``) and stops the exporter."""
        if self.provider is None:
            return
        try:
            self.provider.force_flush(int(timeout_s * 1000))
            self.provider.shutdown()
        except Exception as e:  # a daemon that is down must not fail the rank's shutdown
            log.debug("tracing shutdown: %r", e)


_PROCESS = Tracing()


def current() -> Tracing:
    """This process's tracing (set by :func:`setup`; off until then)."""
    return _PROCESS


def trace_id_of(span: Any) -> str:
    """32 hex digits of a span's trace id; "" for None or an invalid span."""
    if span is None:
        return ""
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def remote_kwargs(method: str) -> dict[str, Any]:
    """Keyword arguments to add to ``actor.<method>.remote(...)``: the carrier, for traced methods."""
    if _PROCESS._tracer is None or method not in _TRACED:
        return {}
    return {"carrier": _PROCESS.carrier()}


def setup(
    *,
    role: str,
    rank: int,
    attempt: int,
    run_id: str = "",
    daemon_url: str | None = None,
    token: str | None = None,
    exporter: Any = None,
    env: Mapping[str, str] | None = None,
) -> Tracing:
    """Sets up this process's tracer (and makes it :func:`current`).

    ``exporter``: a span exporter to use instead of OTLP (tests pass an in-memory one;
    it is flushed synchronously). Never raises: a failure leaves tracing off.
    """
    global _PROCESS
    env = os.environ if env is None else env
    if exporter is None and _off(env):
        _PROCESS = Tracing()
        return _PROCESS
    try:
        _PROCESS = Tracing(_provider(role, rank, attempt, run_id, daemon_url, token, exporter, env))
    except Exception as e:
        log.warning("tracing off: set-up failed: %r", e)
        _PROCESS = Tracing()
    return _PROCESS


def _provider(
    role: str,
    rank: int,
    attempt: int,
    run_id: str,
    daemon_url: str | None,
    token: str | None,
    exporter: Any,
    env: Mapping[str, str],
) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    batch = exporter is None  # OTLP goes through a bounded batch queue; a test exporter runs inline
    if batch:
        exporter = _otlp_exporter(daemon_url, token, env)
        if exporter is None:
            return None
    resource = Resource.create(
        {
            "service.name": env.get("OTEL_SERVICE_NAME") or SERVICE,
            "service.instance.id": f"{role}-{rank}",
            "milepost.run": run_id or env.get(RUN_ID_ENV, ""),
            "milepost.attempt": attempt,
            "milepost.role": role,
            "milepost.rank": rank,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
        }
    )
    provider = TracerProvider(
        resource=resource
    )  # sampler from OTEL_TRACES_SAMPLER (default: parent-based on)
    if batch:
        # Bounded queue, export every OTEL_BSP_SCHEDULE_DELAY ms (5 s): one POST per rank per 5 s.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _otlp_exporter(daemon_url: str | None, token: str | None, env: Mapping[str, str]) -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if daemon_url:
        # The daemon keeps the spans and forwards them: ranks never send past it (no duplicates).
        timeout = (
            None
            if ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT" in env or "OTEL_EXPORTER_OTLP_TIMEOUT" in env)
            else 5.0
        )
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return OTLPSpanExporter(
            endpoint=daemon_url.rstrip("/") + OTLP_TRACES_PATH, headers=headers, timeout=timeout
        )
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return OTLPSpanExporter()
    return None


# -- actors -------------------------------------------------------------------
def _traced(fn: Callable[..., Any], span_name: str, arg_attr: str | None) -> Callable[..., Any]:
    def traced(self: Any, *args: Any, carrier: dict[str, str] | None = None, **kwargs: Any) -> Any:
        tr = current()
        if not tr.enabled:
            return fn(self, *args, **kwargs)
        attrs: dict[str, Any] = {}
        if arg_attr and args and isinstance(args[0], int | str | float):
            attrs[arg_attr] = args[0]
        with tr.remote_span(span_name, carrier, attrs):
            return fn(self, *args, **kwargs)

    # No functools.wraps: Ray reads the signature, and it must show the ``carrier`` keyword.
    traced.__name__ = fn.__name__
    traced.__doc__ = fn.__doc__
    return traced


def traced_actor(cls: type[T], methods: Mapping[str, tuple[str, str | None]]) -> type[T]:
    """A subclass of an actor class whose ``methods`` take a ``carrier`` keyword and run in a span."""
    ns: dict[str, Any] = {}
    for name, (span_name, arg_attr) in methods.items():
        fn = getattr(cls, name, None)
        if callable(fn):
            ns[name] = _traced(fn, span_name, arg_attr)
    return type(cls.__name__, (cls,), ns)
