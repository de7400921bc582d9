"""The daemon's OTLP/HTTP receiver: real SDK exporters post to a real server; ring, API, forwarding."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from milepost.daemon.api import create_app
from milepost.daemon.bus import EventBus
from milepost.daemon.metrics import RunMetrics
from milepost.daemon.otlp_receiver import SpanRing, TraceReceiver, forward_target
from milepost.daemon.recovery_spans import RecoveryTracer
from milepost.daemon.store import Store
from milepost.daemon.telemetry_service import Telemetry
from milepost.engine import step_tracing as tracing
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from tests.otlp_sink import otlp_sink
from tests.servers import FakeController, serve

pytestmark = pytest.mark.timeout(60)

TOKEN = "tok"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def wait_for(what: str, pred: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], tuple[str, Telemetry]]]:
    """Starts the daemon's app with a TraceReceiver built from the given environment."""
    store = Store(tmp_path)
    stack: list[Any] = []

    def start(env: dict[str, str]) -> tuple[str, Telemetry]:
        metrics, traces = RunMetrics(), TraceReceiver(env=env, max_spans=1000)
        metrics.add_collector(traces)
        tel = Telemetry(metrics=metrics, traces=traces)
        app = create_app(
            store, FakeController(store), token=TOKEN, require_token_for_reads=False, telemetry=tel
        )
        cm = serve(app)
        url = cm.__enter__()
        stack.append(cm)
        return url, tel

    yield start
    for cm in stack:
        cm.__exit__(None, None, None)
    store.close()


def emit_step(url: str, token: str = TOKEN) -> tuple[str, list[list[SpanExportResult]]]:
    """A driver step span and a rank span, exported by real OTLP/HTTP exporters."""
    exporters = [_Exporter(url, token), _Exporter(url, token)]
    driver = tracing.Tracing(tracing._provider("driver", 0, 0, "run-t", None, None, exporters[0], {}))
    rank = tracing.Tracing(tracing._provider("trainer", 1, 0, "run-t", None, None, exporters[1], {}))
    with driver.span("step", {"milepost.step": 3}) as step, driver.span("train"):
        carrier = driver.carrier()
        with rank.remote_span("trainer.train_step", carrier, {"milepost.step": 3}):
            pass
    return tracing.trace_id_of(step), [e.results for e in exporters]


class _Exporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter, remembering what each export returned."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(endpoint=url + "/v1/traces", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        self.results: list[SpanExportResult] = []

    def export(self, spans: Any) -> SpanExportResult:
        res = super().export(spans)
        self.results.append(res)
        return res


def test_sdk_exporter_to_receiver_then_traces_api(daemon: Any) -> None:
    url, tel = daemon({})
    trace_id, results = emit_step(url)
    assert all(r == [SpanExportResult.SUCCESS] * len(r) for r in results)
    (summary,) = httpx.get(f"{url}/api/v1/traces").json()["traces"]
    assert summary["trace_id"] == trace_id and summary["root"] == "step" and summary["step"] == 3
    assert summary["span_count"] == 3 and summary["processes"] == ["driver 0", "trainer 1"]
    spans = {s["name"]: s for s in httpx.get(f"{url}/api/v1/traces/{trace_id}").json()["spans"]}
    assert spans["step"]["parent_span_id"] == ""
    assert spans["train"]["parent_span_id"] == spans["step"]["span_id"]
    assert spans["trainer.train_step"]["parent_span_id"] == spans["train"]["span_id"]
    assert spans["trainer.train_step"]["resource"]["milepost.role"] == "trainer"
    assert httpx.get(f"{url}/api/v1/traces/{'0' * 32}").status_code == 404
    assert httpx.get(f"{url}/api/v1/traces/not-hex").status_code == 422
    metrics = httpx.get(f"{url}/metrics").text
    assert 'milepost_otlp_spans_received_total{run_id=""} 3.0' in metrics


def test_writes_need_the_token_and_bad_payloads_are_400(daemon: Any) -> None:
    url, tel = daemon({})
    _, results = emit_step(url, token="wrong")
    assert set(results[0]) == {SpanExportResult.FAILURE} and len(tel.traces.ring) == 0
    post = lambda body, ctype, **h: httpx.post(  # noqa: E731
        f"{url}/v1/traces", content=body, headers={**AUTH, "Content-Type": ctype, **h}
    )
    assert post(b"\xff\x00garbage", "application/x-protobuf").status_code == 400
    assert post(b"{not json", "application/json").status_code == 400
    assert post(b"x", "text/plain").status_code == 400
    assert tel.traces.payloads_rejected == 3


def otlp_json(trace_id: str, n: int = 1) -> dict[str, Any]:
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "milepost.role", "value": {"stringValue": "rollout"}}]},
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": f"{i + 1:016x}",
                                "name": f"span-{i}",
                                "kind": 1,
                                "startTimeUnixNano": str(1_700_000_000_000_000_000 + i),
                                "endTimeUnixNano": str(1_700_000_000_500_000_000 + i),
                                "attributes": [{"key": "milepost.step", "value": {"intValue": "4"}}],
                                "status": {"code": 2, "message": "boom"},
                            }
                            for i in range(n)
                        ]
                    }
                ],
            }
        ]
    }


def test_otlp_json_and_gzip_bodies(daemon: Any) -> None:
    url, _ = daemon({})
    tid = "5b8efff798038103d269b633813fc60c"
    r = httpx.post(f"{url}/v1/traces", json=otlp_json(tid), headers=AUTH)
    assert r.status_code == 200 and r.json() == {}
    body = gzip.compress(json.dumps(otlp_json("a" * 32)).encode())
    headers = {**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    assert httpx.post(f"{url}/v1/traces", content=body, headers=headers).status_code == 200
    (span,) = httpx.get(f"{url}/api/v1/traces/{tid}").json()["spans"]
    assert span["status"] == "error" and span["attributes"]["milepost.step"] == 4
    assert span["duration_s"] == pytest.approx(0.5)


def test_ring_keeps_the_newest_spans() -> None:
    ring = SpanRing(max_spans=5)
    for t in range(4):
        ring.add(
            [
                {
                    "trace_id": f"{t:032x}",
                    "span_id": f"{i:016x}",
                    "parent_span_id": "",
                    "start_ts": i,
                    "end_ts": i,
                    "name": "s",
                    "status": "ok",
                    "attributes": {},
                    "resource": {},
                }
                for i in range(2)
            ]
        )
    assert len(ring) == 5
    assert [s["trace_id"] for s in ring.recent(10)] == [f"{t:032x}" for t in (3, 2, 1)]
    assert len(ring.trace(f"{1:032x}")) == 1 and ring.trace(f"{0:032x}") == []


def test_forwards_to_the_standard_endpoint_with_headers() -> None:
    with otlp_sink() as sink:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
            "OTEL_EXPORTER_OTLP_HEADERS": "x-team=rl,api-key=s3cr%20t",
        }
        rec = TraceReceiver(env=env)
        tid = "0123456789abcdef0123456789abcdef"
        rec.ingest(json.dumps(otlp_json(tid, 3)).encode(), "application/json")
        wait_for("forwarded payload", lambda: sink.requests)
        (req,) = sink.requests
        assert req["path"] == "/v1/traces" and req["headers"]["x-team"] == "rl"
        assert req["headers"]["api-key"] == "s3cr t"
        assert [s["trace_id"] for s in sink.spans()] == [tid] * 3
        fwd = rec.forwarder
        assert fwd is not None
        # The sink records the request before the forwarder has read the answer and counted it.
        wait_for("the forward counted as sent", lambda: fwd.sent == 1)


def test_forward_target_follows_the_standard_variables() -> None:
    assert forward_target({}) is None
    assert forward_target({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/traces"
    both = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x",
    }
    assert forward_target(both) == "http://t/x"
    assert forward_target({**both, "OTEL_TRACES_EXPORTER": "none"}) is None


def test_a_dead_forward_target_never_blocks_the_receiver(daemon: Any) -> None:
    url, tel = daemon(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
    )
    t0 = time.monotonic()
    with httpx.Client(headers=AUTH) as client:
        for i in range(100):
            assert client.post(f"{url}/v1/traces", json=otlp_json(f"{i:032x}")).status_code == 200
    assert time.monotonic() - t0 < 20 and len(tel.traces.ring) == 100
    fwd = tel.traces.forwarder
    assert fwd is not None
    wait_for("every payload failed or dropped", lambda: fwd.failed + fwd.dropped == 100)
    assert fwd.sent == 0


def test_the_daemon_traces_each_recovery_from_failure_to_the_next_step() -> None:
    receiver = TraceReceiver(env={})
    m = RunMetrics(run_info=lambda: {"id": "run-r"})
    bus = EventBus()
    bus.subscribe(m)
    bus.subscribe(RecoveryTracer(receiver, m.run_id))
    for ev in (
        {"kind": "attempt_launched", "attempt": 0, "ts": 90.0},
        {"kind": "attempt_failed", "attempt": 0, "ts": 99.0, "data": {"cause": "actor_died"}},
        {"kind": "attempt_ended", "attempt": 0, "ts": 100.0, "message": "trainer 1 process died"},
        {"kind": "restart_scheduled", "attempt": 0, "ts": 100.5, "data": {"delay_s": 1.0}},
        {"kind": "attempt_launched", "attempt": 1, "ts": 101.5},
        {"kind": "resume_verified", "attempt": 1, "ts": 105.0, "step": 4},
    ):
        bus.event(ev)
    assert len(receiver.ring) == 0  # still recovering
    bus.step({"step": 5, "attempt": 1, "ts": 110.0, "step_s": 1.0})
    (summary,) = receiver.ring.recent()
    (span,) = receiver.ring.trace(summary["trace_id"])
    assert span["name"] == "recovery" and span["duration_s"] == pytest.approx(10.0)
    assert span["resource"]["milepost.role"] == "daemon" and span["resource"]["milepost.run"] == "run-r"
    attrs = span["attributes"]
    assert attrs["milepost.restart.reason"] == "actor_died" and attrs["milepost.resumed_from"] == 4
    assert (attrs["milepost.attempt"], attrs["milepost.next_attempt"], attrs["milepost.first_step"]) == (
        0,
        1,
        5,
    )
