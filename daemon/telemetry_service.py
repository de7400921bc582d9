"""The daemon's telemetry: metrics registry, trace receiver and GPU collector, and their HTTP routes.

- ``GET /metrics``: the run's registry, OpenMetrics (with exemplars) when the Accept header
  asks for it, else the Prometheus text format; reads follow the API's read auth rule.
- ``POST /v1/traces``: OTLP/HTTP (protobuf or JSON) from the ranks; needs the token.
- ``GET /api/v1/traces``: summaries of recent traces; ``GET /api/v1/traces/{trace_id}``: its spans.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import Response
from milepost.engine.contract.process import GPU_COLLECTOR_ENV
from milepost.engine.contract.routes import API, METRICS_PATH, OTLP_TRACES_PATH
from milepost.engine.gpu import GpuCollector
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel, ConfigDict, Field

from .bus import EventBus
from .gpu_metrics import GpuMetrics
from .metrics import RunMetrics
from .otlp_receiver import JSON, MAX_PAYLOAD, PROTOBUF, PayloadError, TraceReceiver
from .recovery_spans import RecoveryTracer

TRACE_ID = r"^[0-9a-f]{32}$"


@dataclass
class Telemetry:
    metrics: RunMetrics
    traces: TraceReceiver
    gpu: GpuCollector | None = None
    bus: EventBus | None = None  # the supervisor publishes to it; metrics and tracer subscribe

    @classmethod
    def for_daemon(
        cls,
        *,
        run_info: Callable[[], dict[str, Any] | None],
        steps: Callable[[], dict[str, Any]],
        heartbeat_timeouts: dict[str, float],
        env: Mapping[str, str] | None = None,
    ) -> Telemetry:
        """The daemon's telemetry; ``steps`` gives the store's step totals (``Store.step_totals``) to seed from."""
        env = os.environ if env is None else env
        gpu = None if env.get(GPU_COLLECTOR_ENV, "1") == "0" else GpuCollector().start()
        metrics = RunMetrics(run_info=run_info, heartbeat_timeouts=heartbeat_timeouts, gpu=GpuMetrics(gpu))
        metrics.seed_totals(steps())
        traces = TraceReceiver(env=env)
        metrics.add_collector(traces)
        bus = EventBus()
        bus.subscribe(metrics)
        bus.subscribe(RecoveryTracer(traces, metrics.run_id))
        return cls(metrics=metrics, traces=traces, gpu=gpu, bus=bus)

    @classmethod
    def standalone(cls) -> Telemetry:
        """No GPU collector, no forwarding: for an app built without a daemon (tests, schema)."""
        metrics = RunMetrics()
        traces = TraceReceiver(env={})
        metrics.add_collector(traces)
        return cls(metrics=metrics, traces=traces)

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.close()


# -- response models ------------------------------------------------------------
class TraceSummary(BaseModel):
    model_config = ConfigDict(extra="allow")
    trace_id: str
    root: str
    step: int | None = None
    start_ts: float
    duration_s: float
    span_count: int
    processes: list[str]
    error: bool


class Traces(BaseModel):
    traces: list[TraceSummary]


class SpanView(BaseModel):
    model_config = ConfigDict(extra="allow")
    trace_id: str
    span_id: str
    parent_span_id: str = Field(description='"" for a root span')
    name: str
    kind: str
    start_ts: float
    end_ts: float
    duration_s: float
    status: str
    attributes: dict[str, Any]
    resource: dict[str, Any]


class TraceSpans(BaseModel):
    trace_id: str
    spans: list[SpanView]


# -- routes -----------------------------------------------------------------------
def install_routes(
    app: FastAPI,
    telemetry: Telemetry,
    *,
    auth: Any,
    read_deps: list[Any],
    read_errors: dict[int | str, dict[str, Any]],
    write_errors: dict[int | str, dict[str, Any]],
    worker: Any,
    api: str = API,
) -> None:
    """``worker``: the API's HotWorker, which runs the OTLP decoding off the event loop."""
    from .api import json_safe, read_body

    @app.get(
        METRICS_PATH,
        dependencies=read_deps,
        responses={**read_errors, 200: {"content": {"text/plain": {}, "application/openmetrics-text": {}}}},
        response_class=Response,
        tags=["telemetry"],
    )
    def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(telemetry.metrics.registry), media_type=content_type)

    @app.post(
        OTLP_TRACES_PATH,
        dependencies=[auth],
        responses={
            **write_errors,
            200: {"content": {PROTOBUF: {}, JSON: {}}, "description": "OTLP ExportTraceServiceResponse"},
            400: {"description": "not an OTLP trace export request"},
            413: {"description": f"body over {MAX_PAYLOAD} bytes"},
        },
        response_class=Response,
        tags=["telemetry"],
    )
    async def otlp_traces(request: Request) -> Response:
        body = await read_body(request, MAX_PAYLOAD)
        ctype = request.headers.get("content-type", PROTOBUF)
        try:
            await worker.run(
                telemetry.traces.ingest, body, ctype, request.headers.get("content-encoding", "")
            )
        except PayloadError as e:
            raise HTTPException(400, str(e)) from e
        if ctype.split(";")[0].strip().lower() == JSON:
            return Response(b"{}", media_type=JSON)
        return Response(b"", media_type=PROTOBUF)  # an empty ExportTraceServiceResponse

    @app.get(f"{api}/traces", response_model=Traces, dependencies=read_deps, responses=read_errors)
    def traces(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
        return {"traces": json_safe(telemetry.traces.ring.recent(limit))}

    @app.get(
        f"{api}/traces/{{trace_id}}",
        response_model=TraceSpans,
        dependencies=read_deps,
        responses={**read_errors, 404: {"description": "no spans of that trace are held"}},
    )
    def trace(trace_id: Annotated[str, Path(pattern=TRACE_ID)]) -> dict[str, Any]:
        spans = telemetry.traces.ring.trace(trace_id)
        if not spans:
            raise HTTPException(404, f"no spans of trace {trace_id} are held")
        return {"trace_id": trace_id, "spans": json_safe(spans)}
