"""Hostile OTLP payloads: overflowing numbers, deep nesting, too many spans, ids of the wrong length.
Each is a PayloadError (HTTP 400 through the daemon's app on 127.0.0.1), never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from milepost.daemon.api import create_app
from milepost.daemon.otlp_receiver import MAX_DEPTH, MAX_SPANS, PayloadError, TraceReceiver
from milepost.daemon.store import Store
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.servers import FakeController, serve

pytestmark = pytest.mark.timeout(60)

TOKEN = "otlp-token"
TRACE, SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


def span(**over: Any) -> dict[str, Any]:
    sp = {"traceId": TRACE, "spanId": SPAN, "name": "step", "startTimeUnixNano": "1", "endTimeUnixNano": "2"}
    return {**sp, **over}


def doc(*spans: dict[str, Any]) -> bytes:
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]}).encode()


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"stringValue": "x"}
    for _ in range(depth):
        value = {"arrayValue": {"values": [value]}}
    return value


def protobuf(trace_id: bytes, span_id: bytes, n: int = 1) -> bytes:
    req = ExportTraceServiceRequest()
    spans = req.resource_spans.add().scope_spans.add()
    for _ in range(n):
        sp = spans.spans.add()
        sp.trace_id, sp.span_id, sp.name = trace_id, span_id, "step"
    return req.SerializeToString()


BAD_JSON = {
    "time past 2**64 ns": doc(span(startTimeUnixNano=str(10**30))),
    "float-overflowing time": doc(span(endTimeUnixNano="1" + "0" * 400)),
    "intValue past int64": doc(span(attributes=[{"key": "k", "value": {"intValue": str(2**70)}}])),
    "nesting past the limit": doc(span(attributes=[{"key": "k", "value": nested(MAX_DEPTH + 1)}])),
    "JSON nested past the recursion limit": b"[" * 100_000 + b"]" * 100_000,
    "short trace id": doc(span(traceId="abcd")),
    "too many spans": doc(*[span() for _ in range(MAX_SPANS + 1)]),
}
BAD_PROTOBUF = {
    "trace id of 4 bytes": protobuf(b"\x01" * 4, b"\x02" * 8),
    "span id of 16 bytes": protobuf(b"\x01" * 16, b"\x02" * 16),
    "too many spans": protobuf(b"\x01" * 16, b"\x02" * 8, n=MAX_SPANS + 1),
}


@pytest.mark.parametrize("body", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_bad_json_payloads_are_payload_errors(body: bytes) -> None:
    with pytest.raises(PayloadError):
        TraceReceiver(env={}).ingest(body, "application/json")


@pytest.mark.parametrize("body", BAD_PROTOBUF.values(), ids=BAD_PROTOBUF.keys())
def test_bad_protobuf_payloads_are_payload_errors(body: bytes) -> None:
    with pytest.raises(PayloadError):
        TraceReceiver(env={}).ingest(body)


def test_nesting_within_the_limit_and_good_ids_are_kept() -> None:
    rec = TraceReceiver(env={})
    assert (
        rec.ingest(doc(span(attributes=[{"key": "k", "value": nested(MAX_DEPTH)}])), "application/json") == 1
    )
    assert rec.ingest(protobuf(b"\x01" * 16, b"\x02" * 8, n=3)) == 3


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run_dir: Path = tmp_path_factory.mktemp("run")
    store = Store(run_dir)
    with serve(create_app(store, FakeController(store), token=TOKEN, require_token_for_reads=False)) as u:
        yield u
    store.close()


@pytest.mark.parametrize("name", ["float-overflowing time", "JSON nested past the recursion limit"])
def test_over_http_a_bad_payload_is_400_and_the_receiver_goes_on(url: str, name: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/traces", content=BAD_JSON[name], headers=headers)
        assert r.status_code == 400, r.text
        assert http.post("/v1/traces", content=doc(span()), headers=headers).status_code == 200
