"""The daemon's OTLP/HTTP trace receiver: keeps recent spans for the dashboard, forwards the rest.

Ranks POST ``ExportTraceServiceRequest`` payloads (protobuf, or OTLP/JSON) to
``/v1/traces``. Spans go into a bounded ring (oldest out first) indexed by trace id.
When ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set
(and ``OTEL_TRACES_EXPORTER`` is not ``none``), each accepted payload is also queued,
unchanged, for a forwarder thread that POSTs it there with ``OTEL_EXPORTER_OTLP_[TRACES_]
HEADERS``, ``..._TIMEOUT`` (seconds, as the Python SDK reads it) and ``..._COMPRESSION``
(gzip); a full queue drops the payload and counts it, never blocking the receiver.

A payload is refused whole (``PayloadError``, HTTP 400) when it is not OTLP, holds more than
``MAX_SPANS`` spans, nests attribute values deeper than ``MAX_DEPTH``, has an id of the wrong
length (trace 16 bytes, span 8) or a number out of its OTLP range: bad input from a rank or a
stranger is a 400, never a 500 or a daemon thread's crash.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

from milepost.engine.contract.routes import OTLP_TRACES_PATH
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
MAX_PAYLOAD = 16 * 1024 * 1024
MAX_ATTRIBUTES = 32
MAX_STRING = 256
MAX_SPANS = 10_000  # per payload; the SDK's batch processor sends at most 512
MAX_DEPTH = 16  # nested array / kvlist values
_U64 = 2**64  # OTLP times are fixed64 nanoseconds
_I64 = 2**63  # OTLP intValue is int64
_STATUS = {0: "unset", 1: "ok", 2: "error"}
_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


class PayloadError(ValueError):
    """A body that is not an OTLP trace export request."""


# -- decoding -----------------------------------------------------------------
def _deeper(depth: int) -> int:
    if depth >= MAX_DEPTH:
        raise PayloadError(f"attribute values nested deeper than {MAX_DEPTH}")
    return depth + 1


def _any_value(v: Any, depth: int = 0) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        d = _deeper(depth)
        return [_any_value(x, d) for x in v.array_value.values[:MAX_ATTRIBUTES]]
    if which == "kvlist_value":
        d = _deeper(depth)
        return {kv.key: _any_value(kv.value, d) for kv in v.kvlist_value.values[:MAX_ATTRIBUTES]}
    if which == "bytes_value":
        return v.bytes_value.hex()[:MAX_STRING]
    out = getattr(v, which)
    return out[:MAX_STRING] if isinstance(out, str) else out


def _json_value(v: dict[str, Any], depth: int = 0) -> Any:
    for key, value in v.items():
        if key == "intValue":
            return _ranged(value, -_I64, _I64, "intValue")
        if key == "doubleValue":
            return float(value)
        if key == "arrayValue":
            d = _deeper(depth)
            return [_json_value(x, d) for x in value.get("values", [])[:MAX_ATTRIBUTES]]
        if key == "kvlistValue":
            d = _deeper(depth)
            return {
                kv["key"]: _json_value(kv.get("value", {}), d)
                for kv in value.get("values", [])[:MAX_ATTRIBUTES]
            }
        if key in ("stringValue", "boolValue", "bytesValue"):
            return value[:MAX_STRING] if isinstance(value, str) else value
    return None


def _span(
    *,
    trace_id: str,
    span_id: str,
    parent: str,
    name: str,
    kind: int,
    start_ns: int,
    end_ns: int,
    status: int,
    message: str,
    attributes: dict[str, Any],
    resource: dict[str, Any],
) -> dict[str, Any]:
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_span_id": parent,
        "name": name[:MAX_STRING],
        "kind": _KINDS.get(kind, "unspecified"),
        "start_ts": start_ns / 1e9,
        "end_ts": end_ns / 1e9,
        "duration_s": max(0, end_ns - start_ns) / 1e9,
        "status": _STATUS.get(status, "unset"),
        "status_message": message[:MAX_STRING],
        "attributes": attributes,
        "resource": resource,
    }


def _ranged(value: Any, low: int, high: int, name: str) -> int:
    n = int(value)
    if not low <= n < high:
        raise PayloadError(f"{name} {n}: out of range [{low}, {high})")
    return n


def _bytes_id(raw: bytes, size: int, name: str, *, empty_ok: bool = False) -> str:
    if len(raw) != size and not (empty_ok and not raw):
        raise PayloadError(f"{name} of {len(raw)} bytes: want {size}")
    return raw.hex()


def _count(n: int) -> None:
    if n > MAX_SPANS:
        raise PayloadError(f"{n} spans or more in one payload: at most {MAX_SPANS}")


def decode_protobuf(body: bytes) -> list[dict[str, Any]]:
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(body)
    except (DecodeError, RecursionError) as e:
        raise PayloadError(f"not an OTLP protobuf ExportTraceServiceRequest: {e}") from e
    _count(sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans))
    spans = []
    for rs in req.resource_spans:
        resource = {kv.key: _any_value(kv.value) for kv in rs.resource.attributes[:MAX_ATTRIBUTES]}
        for ss in rs.scope_spans:
            for sp in ss.spans:
                spans.append(
                    _span(
                        trace_id=_bytes_id(sp.trace_id, 16, "trace_id"),
                        span_id=_bytes_id(sp.span_id, 8, "span_id"),
                        parent=_bytes_id(sp.parent_span_id, 8, "parent_span_id", empty_ok=True),
                        name=sp.name,
                        kind=sp.kind,
                        start_ns=sp.start_time_unix_nano,
                        end_ns=sp.end_time_unix_nano,
                        status=sp.status.code,
                        message=sp.status.message,
                        attributes={kv.key: _any_value(kv.value) for kv in sp.attributes[:MAX_ATTRIBUTES]},
                        resource=resource,
                    )
                )
    return spans


def decode_json(body: bytes) -> list[dict[str, Any]]:
    """OTLP/JSON: ids are hex strings and 64-bit integers may be strings (OTLP spec, not proto3 JSON)."""
    try:
        doc = json.loads(body)
        spans: list[dict[str, Any]] = []
        for rs in doc.get("resourceSpans", []):
            attrs = (rs.get("resource") or {}).get("attributes", [])
            resource = {kv["key"]: _json_value(kv.get("value", {})) for kv in attrs[:MAX_ATTRIBUTES]}
            for ss in rs.get("scopeSpans", []):
                for sp in ss.get("spans", []):
                    _count(len(spans) + 1)
                    status = sp.get("status") or {}
                    spans.append(
                        _span(
                            trace_id=_hex_id(sp["traceId"], 32),
                            span_id=_hex_id(sp["spanId"], 16),
                            parent=_hex_id(sp.get("parentSpanId", ""), 16) if sp.get("parentSpanId") else "",
                            name=str(sp.get("name", "")),
                            kind=int(sp.get("kind", 0)),
                            start_ns=_ranged(sp.get("startTimeUnixNano", 0), 0, _U64, "startTimeUnixNano"),
                            end_ns=_ranged(sp.get("endTimeUnixNano", 0), 0, _U64, "endTimeUnixNano"),
                            status=int(status.get("code", 0)),
                            message=str(status.get("message", "")),
                            attributes={
                                kv["key"]: _json_value(kv.get("value", {}))
                                for kv in sp.get("attributes", [])[:MAX_ATTRIBUTES]
                            },
                            resource=resource,
                        )
                    )
        return spans
    except PayloadError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        raise PayloadError(f"not an OTLP/JSON trace export request: {type(e).__name__}: {e}"[:500]) from e


def _hex_id(value: Any, digits: int) -> str:
    s = str(value).lower()
    if len(s) != digits or any(c not in "0123456789abcdef" for c in s):
        raise ValueError(f"id {value!r}: want {digits} hex digits")
    return s


# -- storage --------------------------------------------------------------------
class SpanRing:
    """The newest ``max_spans`` spans, by trace id. Thread-safe."""

    def __init__(self, max_spans: int = 20_000) -> None:
        self.max_spans = max_spans
        self._order: collections.deque[str] = collections.deque()  # trace id of each span, oldest first
        self._traces: collections.OrderedDict[str, collections.deque[dict[str, Any]]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._order)

    def add(self, spans: list[dict[str, Any]]) -> None:
        with self._lock:
            for sp in spans:
                tid = sp["trace_id"]
                self._traces.setdefault(tid, collections.deque()).append(sp)
                self._traces.move_to_end(tid)
                self._order.append(tid)
                while len(self._order) > self.max_spans:
                    old = self._order.popleft()
                    held = self._traces[old]
                    held.popleft()  # a trace's spans leave in the order they came
                    if not held:
                        del self._traces[old]

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self._lock:
            spans = list(self._traces.get(trace_id, ()))
        return sorted(spans, key=lambda s: s["start_ts"])

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """Summaries of the newest traces, newest first."""
        with self._lock:
            ids = list(self._traces)[-limit:][::-1]
            held = [(tid, list(self._traces[tid])) for tid in ids]
        return [summarize(tid, spans) for tid, spans in held]


def summarize(trace_id: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if not s["parent_span_id"] or s["parent_span_id"] not in ids]
    root = min(roots or spans, key=lambda s: s["start_ts"])
    start = min(s["start_ts"] for s in spans)
    end = max(s["end_ts"] for s in spans)
    procs = {
        f"{s['resource'].get('milepost.role', '?')} {s['resource'].get('milepost.rank', '?')}" for s in spans
    }
    step = root["attributes"].get("milepost.step")
    return {
        "trace_id": trace_id,
        "root": root["name"],
        "step": step if isinstance(step, int) else None,
        "start_ts": start,
        "duration_s": max(0.0, end - start),
        "span_count": len(spans),
        "processes": sorted(procs),
        "error": any(s["status"] == "error" for s in spans),
    }


# -- forwarding -------------------------------------------------------------------
def forward_target(env: Mapping[str, str]) -> str | None:
    """Where to forward, from the standard variables; None when unset or disabled."""
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    if url := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return url
    if base := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return base.rstrip("/") + OTLP_TRACES_PATH
    return None


class Forwarder:
    """POSTs payloads to another OTLP/HTTP receiver from one thread, through a bounded queue."""

    def __init__(self, url: str, env: Mapping[str, str], *, max_queue: int = 256) -> None:
        from opentelemetry.util.re import parse_env_headers

        self.url = url
        raw = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS", "")
        self.headers = parse_env_headers(raw, liberal=True)
        timeout = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT") or "10"
        )
        try:
            self.timeout_s = float(timeout)
        except ValueError:
            self.timeout_s = 10.0
        compression = env.get("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION") or env.get(
            "OTEL_EXPORTER_OTLP_COMPRESSION", ""
        )
        self.gzip = compression.strip().lower() == "gzip"
        self.sent = self.failed = self.dropped = 0
        self._q: queue.Queue[tuple[bytes, str]] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="milepost-otlp-forward", daemon=True)
        self._thread.start()

    def submit(self, body: bytes, content_type: str) -> None:
        try:
            self._q.put_nowait((body, content_type))
        except queue.Full:
            self.dropped += 1

    def _loop(self) -> None:
        failures = 0
        while True:
            body, ctype = self._q.get()
            headers = {**self.headers, "Content-Type": ctype}
            if self.gzip:
                body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    r.read()
                self.sent += 1
                failures = 0
            except (OSError, urllib.error.URLError, ValueError) as e:
                self.failed += 1
                failures += 1
                if failures in (1, 10, 100) or failures % 1000 == 0:
                    log.warning("forwarding spans to %s failed (%d in a row): %s", self.url, failures, e)


class TraceReceiver:
    """Decodes, stores and forwards OTLP trace payloads; exposes its own counters as metrics."""

    def __init__(self, *, max_spans: int = 20_000, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.ring = SpanRing(max_spans)
        target = forward_target(env)
        self.forwarder = Forwarder(target, env) if target else None
        self.spans_received = 0
        self.payloads_rejected = 0
        self.last_received = 0.0

    def ingest(self, body: bytes, content_type: str = PROTOBUF, content_encoding: str = "") -> int:
        """Stores (and queues for forwarding) one payload; returns its span count. Raises PayloadError."""
        try:
            if content_encoding.strip().lower() == "gzip":
                body = _gunzip(body)
            kind = content_type.split(";")[0].strip().lower()
            if kind == JSON:
                spans = decode_json(body)
            elif kind in (PROTOBUF, "application/protobuf", ""):
                spans = decode_protobuf(body)
            else:
                raise PayloadError(f"content type {content_type!r}: want {PROTOBUF} or {JSON}")
        except PayloadError:
            self.payloads_rejected += 1
            raise
        self.ring.add(spans)
        self.spans_received += len(spans)
        self.last_received = time.time()
        if self.forwarder is not None and spans:
            self.forwarder.submit(body, JSON if kind == JSON else PROTOBUF)
        return len(spans)

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "milepost_otlp_spans_received", "Spans the daemon's OTLP receiver accepted"
        )
        received.add_metric([], float(self.spans_received))
        rejected = CounterMetricFamily(
            "milepost_otlp_payloads_rejected", "OTLP payloads the receiver could not decode"
        )
        rejected.add_metric([], float(self.payloads_rejected))
        held = GaugeMetricFamily("milepost_trace_store_spans", "Spans held for the dashboard (bounded ring)")
        held.add_metric([], float(len(self.ring)))
        yield from (received, rejected, held)
        if self.forwarder is not None:
            fwd = CounterMetricFamily(
                "milepost_otlp_forwarded_payloads",
                "Span payloads forwarded to OTEL_EXPORTER_OTLP_ENDPOINT, by outcome",
                labels=["status"],
            )
            fwd.add_metric(["sent"], float(self.forwarder.sent))
            fwd.add_metric(["failed"], float(self.forwarder.failed))
            fwd.add_metric(["dropped"], float(self.forwarder.dropped))
            yield fwd


def _gunzip(body: bytes) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(body)) as f:
            out = f.read(MAX_PAYLOAD + 1)
    except (OSError, EOFError) as e:
        raise PayloadError(f"bad gzip body: {e}") from e
    if len(out) > MAX_PAYLOAD:
        raise PayloadError(f"payload over {MAX_PAYLOAD} bytes once decompressed")
    return out
