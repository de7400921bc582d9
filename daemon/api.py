"""The daemon's HTTP API (FastAPI): run status, goodput, ranks, events, steps, checkpoints,
control actions and rank-report ingest.

Reads come from the store or the controller; writes (every POST) need the run's bearer
token, and so do reads when ``require_token_for_reads`` (the daemon binds beyond loopback).
Every write passes ``daemon.api_guard.WriteGuard`` first (token, then body cap and deadline,
before a byte of the body is read): a route added here gets it without asking.
Handlers are plain ``def``: FastAPI runs them in a thread pool, so a slow SQLite call or
controller lock never blocks the event loop. The two routes every rank posts to several
times a second (``/api/v1/ingest`` and OTLP ``/v1/traces``) read and validate their body
themselves and run on one worker thread of their own: through FastAPI's body parsing,
thread-pool hop and response-model serialisation, a report cost the daemon about 2.7 ms of
CPU, nine tenths of it that machinery (py-spy under load).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from milepost.daemon.alert_routes import install_routes as install_alert_routes
from milepost.daemon.alerting import DaemonAlerting
from milepost.daemon.api_guard import WriteGuard, WriteLimits
from milepost.daemon.api_models import (
    Attempts,
    Checkpoints,
    ControlResult,
    Diagnoses,
    ErrorBody,
    Events,
    FaultResult,
    Goodput,
    Health,
    IngestResult,
    Ranks,
    Status,
    Steps,
)
from milepost.daemon.api_views import CheckpointSizes, ViewHistory, install_view_routes
from milepost.daemon.auth import tokens_equal
from milepost.daemon.ingest_parse import RejectLog, envelope_errors, parse_batch
from milepost.daemon.otlp_receiver import MAX_PAYLOAD
from milepost.daemon.store import Store
from milepost.daemon.telemetry_service import Telemetry
from milepost.daemon.telemetry_service import install_routes as install_telemetry_routes
from milepost.engine.contract.enums import ControlAction
from milepost.engine.contract.routes import API, FAULTS_PATH, HEALTHZ_PATH, INGEST_PATH, OTLP_TRACES_PATH
from milepost.engine.contract.wire import I64_MAX, FaultRequest, IngestBatch
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

MAX_EVENTS = 5000
MAX_STEPS = 10000
T = TypeVar("T")


class Controller(Protocol):
    """What the API needs of the run; FakeController in the tests, daemon.controller.RunController in production."""

    # keys at least: run_id, name, state, reason, step, target_steps, attempt, world_size,
    # goodput (float 0..1), restarts, started_at, updated_at
    def status(self) -> dict[str, Any]: ...

    # keys: goodput, wall_s, productive_s,
    # badput: {startup_s, recovery_s, lost_progress_s, checkpoint_stall_s, other_s}
    def goodput(self) -> dict[str, Any]: ...

    # action in {"pause","resume","stop","checkpoint"}; returns {"action":..., "accepted": bool, "state": ...};
    # raises ValueError(msg) if not possible in the current state (-> 409)
    def control(self, action: str) -> dict[str, Any]: ...

    # rank reports; returns {"accepted": int, "control": [...], "faults": [...]}
    def ingest(self, batch: dict[str, Any]) -> dict[str, Any]: ...

    # each: role, rank, attempt, host, pid, step, phase, state, heartbeat_age_seconds
    def ranks(self) -> list[dict[str, Any]]: ...

    # hang diagnoses, newest first: id, kind, culprit_ranks, group, seq, op, onset_at, detected_at, action
    def diagnoses(self) -> list[dict[str, Any]]: ...

    # queues a fault for a rank of the running attempt; ValueError when impossible (-> 409),
    # PermissionError when the run does not allow faults (-> 403)
    def inject(self, fault: dict[str, Any]) -> dict[str, Any]: ...


def json_safe(value: Any) -> Any:
    """Non-finite floats become None: strict JSON has no NaN, and a NaN loss must not turn a read into a 500."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_response(payload: Any, status_code: int = 200) -> Response:
    return Response(
        json.dumps(json_safe(payload), default=str).encode(), status_code, media_type="application/json"
    )


async def read_body(request: Request, limit: int = MAX_PAYLOAD) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def validate_body(model: type[BaseModel], body: bytes) -> Any:
    """``model`` parsed from JSON ``body``; a refusal is FastAPI's 422, each error's loc under "body"."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = [
            {**err, "loc": ["body", *err.get("loc", ())]}
            for err in e.errors(include_url=False, include_context=False)
        ]
        # Inputs may be bytes or NaN: make the detail plain JSON.
        raise HTTPException(422, json.loads(json.dumps(json_safe(errors), default=str))) from e


class HotWorker:
    """The one thread that runs the hot routes' work off the event loop (in arrival order)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milepost-ingest")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _body_schema(app: FastAPI, route: str, model: type[BaseModel]) -> None:
    """Documents ``model`` as the JSON body of ``POST route`` (a route that reads its body itself)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        own = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(own.pop("$defs", {}))
        schemas[model.__name__] = own
        doc["paths"][route]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


class CatchAll:
    """Turns an exception no handler caught into a JSON 500.

    Why not ``app.exception_handler(Exception)``: Starlette re-raises after that handler, and
    uvicorn then drops the keep-alive connection, so a rank's next report fails too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            log.error("unhandled error in %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if started:  # too late for a clean answer: let the server close the connection
                raise
            body = {"detail": f"internal error: {type(exc).__name__}"}
            await JSONResponse(body, status_code=500)(scope, receive, send)


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"}
}


_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description="the run's token (<run_dir>/token)")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]


def _auth_dependency(token: str) -> Any:
    # async: a plain def dependency would cost every request a thread-pool hop.
    async def require_token(creds: BearerCredentials) -> None:
        if creds is None or not tokens_equal(creds.credentials, token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return Depends(require_token)


def create_app(
    store: Store,
    controller: Controller,
    *,
    token: str,
    require_token_for_reads: bool,
    telemetry: Telemetry | None = None,
    limits: WriteLimits | None = None,
    alerting: DaemonAlerting | None = None,
) -> FastAPI:
    """``telemetry``: the daemon's metrics and trace receiver (a standalone one when None);
    ``limits``: the writes' body caps, deadline and in-flight bound (the defaults when None);
    ``alerting``: the run's alerts (None: the alert routes answer empty reads and 503 writes)."""
    if not token:
        raise ValueError("create_app: an empty token would let anyone write")
    app = FastAPI(title="milepost daemon", version="1", summary="Supervisor of an LLM RL post-training run")
    app.add_middleware(CatchAll)
    # Outermost but Starlette's own: the token and the size cap come before any body is read.
    limits = limits or WriteLimits(body_caps={INGEST_PATH: MAX_PAYLOAD, OTLP_TRACES_PATH: MAX_PAYLOAD})
    app.add_middleware(WriteGuard, token=token, limits=limits)
    auth = _auth_dependency(token)
    read_deps = [auth] if require_token_for_reads else []
    read_errors = _ERRORS if require_token_for_reads else {}

    @app.get(HEALTHZ_PATH, response_model=Health, tags=["health"])
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    @app.get(f"{API}/status", response_model=Status, dependencies=read_deps, responses=read_errors)
    def status() -> dict[str, Any]:
        return json_safe(controller.status())

    @app.get(f"{API}/goodput", response_model=Goodput, dependencies=read_deps, responses=read_errors)
    def goodput() -> dict[str, Any]:
        return json_safe(controller.goodput())

    def list_route(key: str, model: type[BaseModel], rows: Callable[[], list[dict[str, Any]]]) -> None:
        """GET ``{API}/<key>``: ``{key: rows()}``, guarded like every read."""

        def endpoint() -> dict[str, Any]:
            return {key: json_safe(rows())}

        app.add_api_route(
            f"{API}/{key}",
            endpoint,
            methods=["GET"],
            name=key,
            response_model=model,
            dependencies=read_deps,
            responses=read_errors,
        )

    list_route("ranks", Ranks, controller.ranks)
    list_route("attempts", Attempts, store.attempts)

    @app.get(f"{API}/events", response_model=Events, dependencies=read_deps, responses=read_errors)
    def events(
        since_id: Annotated[int, Query(ge=0, le=I64_MAX)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 200,
        kind: Annotated[str | None, Query(max_length=256)] = None,
        attempt: Annotated[int | None, Query(ge=0, le=I64_MAX)] = None,
        newest_first: bool = False,
    ) -> dict[str, Any]:
        rows = store.events(
            since_id=since_id, limit=limit, kind=kind, attempt=attempt, newest_first=newest_first
        )
        last_id = max((int(r["id"]) for r in rows), default=since_id)
        return {"events": json_safe(rows), "last_id": last_id}

    @app.get(f"{API}/steps", response_model=Steps, dependencies=read_deps, responses=read_errors)
    def steps(
        since: Annotated[int, Query(ge=0, le=I64_MAX)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_STEPS)] = MAX_STEPS,
    ) -> dict[str, Any]:
        return {"steps": json_safe(store.steps(since=since, limit=limit))}

    list_route("checkpoints", Checkpoints, CheckpointSizes(store))
    list_route("diagnoses", Diagnoses, controller.diagnoses)

    @app.post(
        FAULTS_PATH,
        response_model=FaultResult,
        dependencies=[auth],
        responses={
            **_ERRORS,
            403: {
                "model": ErrorBody,
                "description": "the job does not allow faults ([supervisor] allow_faults)",
            },
            409: {"model": ErrorBody, "description": "no attempt to inject into"},
        },
    )
    def faults(fault: FaultRequest) -> dict[str, Any]:
        try:
            return json_safe(controller.inject(fault.model_dump(mode="json")))
        except PermissionError as e:
            raise HTTPException(403, str(e)) from e
        except ValueError as e:
            raise HTTPException(409, str(e)) from e

    @app.post(
        f"{API}/control/{{action}}",
        response_model=ControlResult,
        dependencies=[auth],
        responses={
            **_ERRORS,
            409: {"model": ErrorBody, "description": "not possible in the run's current state"},
        },
    )
    def control(action: ControlAction) -> dict[str, Any]:
        try:
            return json_safe(controller.control(action.value))
        except ValueError as e:
            raise HTTPException(409, str(e)) from e

    tele = telemetry or Telemetry.standalone()
    rejects = RejectLog()
    hot = HotWorker()
    app.router.on_shutdown.append(hot.close)

    @app.post(
        INGEST_PATH,
        response_model=IngestResult,
        dependencies=[auth],
        responses={
            **_ERRORS,
            400: {"model": ErrorBody, "description": "reports the controller refused"},
            413: {"model": ErrorBody, "description": f"body over {MAX_PAYLOAD} bytes"},
            422: {"model": ErrorBody, "description": "not an IngestBatch (FastAPI's validation errors)"},
        },
    )
    async def ingest(request: Request) -> Response:
        """Rank reports (milepost.engine.contract.wire.Report), each validated alone; the answer carries
        control requests and faults, and how many reports were refused (``rejected``, ``errors``)."""
        body = await read_body(request)
        try:
            parsed = parse_batch(body)
        except ValidationError as e:  # the envelope is wrong: a 422 shaped as FastAPI's
            raise HTTPException(422, json_safe(envelope_errors(e))) from e
        if parsed.rejected:
            rejects.add(parsed)
            for role in parsed.rejected_roles:
                tele.metrics.reports_rejected.labels(role).inc()
            if parsed.nothing_usable:
                raise HTTPException(422, json.loads(json.dumps(json_safe(parsed.errors), default=str)))
        batch = {"reports": parsed.reports, "heartbeats": parsed.heartbeats}
        try:
            result = await hot.run(controller.ingest, batch)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        if parsed.rejected:
            result = {**result, "rejected": parsed.rejected, "errors": parsed.errors}
        return json_response(result)

    _body_schema(app, INGEST_PATH, IngestBatch)

    for path, model in install_alert_routes(
        app, alerting, auth=auth, read_deps=read_deps, read_errors=read_errors, write_errors=_ERRORS
    ):
        _body_schema(app, path, model)

    install_telemetry_routes(
        app,
        tele,
        auth=auth,
        read_deps=read_deps,
        read_errors=read_errors,
        write_errors=_ERRORS,
        worker=hot,
    )
    history = ViewHistory()
    if tele.bus is not None:
        tele.bus.subscribe(history)
    install_view_routes(app, store, controller, tele, history, read_deps=read_deps, read_errors=read_errors)
    app.state.view_history = history  # the dashboard bench feeds simulated ranks through it
    return app
