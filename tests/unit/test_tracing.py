"""Tracing: spans per step and phase, W3C carriers into other processes, the OTEL_* variables.

Spans go to in-memory exporters; a "remote" process is a second tracer provider with its
own resource that only sees the carrier, as a Ray actor does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from milepost.engine import step_tracing as tracing
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def reset_process_tracer() -> Iterator[None]:
    yield
    tracing.current().shutdown()
    tracing._PROCESS = tracing.Tracing()


def remote_process(role: str, rank: int, exporter: InMemorySpanExporter) -> tracing.Tracing:
    """Another process's tracer (not this process's current one)."""
    return tracing.Tracing(tracing._provider(role, rank, 0, "run-x", None, None, exporter, {}))


def by_name(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_step_phase_and_remote_spans_share_one_trace_with_correct_parents() -> None:
    driver_spans, rank_spans = InMemorySpanExporter(), InMemorySpanExporter()
    tr = tracing.setup(role="driver", rank=0, attempt=2, run_id="run-x", exporter=driver_spans)
    assert tracing.current() is tr and tr.enabled
    trainer = remote_process("trainer", 1, rank_spans)
    with tr.span("step", {"milepost.step": 7}) as step_span, tr.span("train", {"milepost.phase": "train"}):
        carrier = tracing.remote_kwargs("train_step")["carrier"]
        assert carrier["traceparent"].startswith("00-" + tracing.trace_id_of(step_span))
        with trainer.remote_span("trainer.train_step", carrier, {"milepost.step": 7}):
            pass
    assert tracing.remote_kwargs("setup") == {}  # untraced methods get no carrier
    d, r = by_name(driver_spans), by_name(rank_spans)
    step, train, remote = d["step"], d["train"], r["trainer.train_step"]
    assert step.parent is None
    assert train.parent.span_id == step.context.span_id
    assert remote.parent.span_id == train.context.span_id and remote.parent.is_remote
    assert {step.context.trace_id, train.context.trace_id, remote.context.trace_id} == {step.context.trace_id}
    assert tracing.trace_id_of(step_span) == format(step.context.trace_id, "032x")
    res = dict(step.resource.attributes)
    assert res["service.name"] == "milepost" and res["milepost.run"] == "run-x"
    assert (res["milepost.attempt"], res["milepost.role"], res["milepost.rank"]) == (2, "driver", 0)
    assert remote.resource.attributes["milepost.role"] == "trainer"
    assert remote.resource.attributes["milepost.rank"] == 1


class Worker:
    def generate(self, step: int, prompts: list[int], expected_version: int) -> int:
        """Generates."""
        return step + len(prompts) + expected_version

    def health(self) -> str:
        return "ok"


def test_traced_actor_opens_a_child_span_from_the_carrier() -> None:
    driver_spans = InMemorySpanExporter()
    tr = tracing.setup(role="rollout", rank=0, attempt=0, exporter=driver_spans)
    traced = tracing.traced_actor(Worker, tracing.ROLLOUT_METHODS)
    assert issubclass(traced, Worker) and traced.__name__ == "Worker"
    w = traced()
    with tr.span("rollout") as parent:
        carrier = tr.carrier()
    assert w.generate(3, [1, 2], 5, carrier=carrier) == 10  # type: ignore[call-arg]
    assert w.generate(3, [1], 5) == 9 and w.health() == "ok"
    spans = [s for s in driver_spans.get_finished_spans() if s.name == "rollout.generate"]
    assert len(spans) == 2
    child = spans[0]
    assert child.parent.span_id == parent.get_span_context().span_id
    assert child.attributes["milepost.step"] == 3
    assert spans[1].parent is None  # no carrier: a root span, the call still works


def test_exceptions_mark_the_span_and_propagate() -> None:
    exp = InMemorySpanExporter()
    tr = tracing.setup(role="driver", rank=0, attempt=0, exporter=exp)
    with pytest.raises(RuntimeError), tr.span("train"):
        raise RuntimeError("rank 1 died")
    (span,) = exp.get_finished_spans()
    assert span.status.status_code.name == "ERROR" and span.events[0].name == "exception"


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"},
        {"MILEPOST_TRACING": "0", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"},
        {},  # no daemon and no endpoint: nowhere to send spans
    ],
)
def test_off_is_a_cheap_no_op(env: dict[str, str]) -> None:
    tr = tracing.setup(role="driver", rank=0, attempt=0, env=env)
    assert not tr.enabled and tr.carrier() is None and tracing.remote_kwargs("train_step") == {}
    with tr.span("step") as span:
        assert span is None and tracing.trace_id_of(span) == ""
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        with tr.span("step"):
            pass
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 20e-6, f"{per_call * 1e6:.2f} us per disabled span"


def test_otlp_to_the_daemon_or_to_the_standard_endpoint() -> None:
    tr = tracing.setup(role="trainer", rank=1, attempt=0, daemon_url="http://127.0.0.1:9", token="t", env={})
    assert tr.enabled
    tr.provider.shutdown()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    assert tracing.setup(role="driver", rank=0, attempt=0, env=env).enabled


def test_standard_resource_and_sampler_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "rl-prod")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exp = InMemorySpanExporter()
    tr = tracing.setup(role="driver", rank=0, attempt=0, exporter=exp)
    res = tr.provider.resource.attributes
    assert res["service.name"] == "rl-prod" and res["deployment.environment"] == "staging"
    with tr.span("step") as span:
        carrier = tr.carrier()
    assert exp.get_finished_spans() == () and not span.get_span_context().trace_flags.sampled
    assert carrier is not None
    assert int(carrier["traceparent"].rsplit("-", 1)[1], 16) & 1 == 0  # not sampled: downstream neither
