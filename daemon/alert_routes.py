"""The alerting routes of the daemon's API.

- ``GET /api/v1/alerts``: alerts firing, pending and resolved (with what mutes each), and
  delivery: notifications pending per receiver, receivers held (an unset secret) and history.
- ``GET /api/v1/silences``; ``POST /api/v1/silences`` (a SilenceRequest) and
  ``DELETE /api/v1/silences/{id}`` (expire it now) need the run's token.
- ``POST /api/v1/alerts/test`` (token): a test alert straight to one receiver, and its answer.

The writes check the token before they read the body (like ingest): a caller without it
cannot make the daemon parse anything.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Request
from fastapi.responses import Response
from milepost.engine.contract.routes import ALERTS_PATH, ALERTS_TEST_PATH, SILENCES_PATH

from .alerting import DaemonAlerting
from .api_models import (
    Alerts,
    AlertTestRequest,
    AlertTestResult,
    ErrorBody,
    SilenceRequest,
    Silences,
    SilenceView,
)

SILENCE_ID = r"^[0-9a-f]{1,64}$"
MAX_BODY = 64 * 1024


def _silence_view(sil: Any, now: float) -> dict[str, Any]:
    return {**sil.model_dump(mode="json"), "active": sil.active(now)}


def install_routes(
    app: FastAPI,
    alerting: DaemonAlerting | None,
    *,
    auth: Any,
    read_deps: list[Any],
    read_errors: dict[int | str, dict[str, Any]],
    write_errors: dict[int | str, dict[str, Any]],
) -> list[tuple[str, type[Any]]]:
    """Adds the routes; returns (path, body model) of the POSTs that read their own body."""
    from .api import json_response, json_safe, read_body, validate_body

    unavailable: dict[int | str, dict[str, Any]] = {
        503: {"model": ErrorBody, "description": "alerting is not running in this daemon"}
    }

    def need() -> DaemonAlerting:
        if alerting is None:
            raise HTTPException(503, "alerting is not running in this daemon")
        return alerting

    @app.get(
        ALERTS_PATH, response_model=Alerts, dependencies=read_deps, responses=read_errors, tags=["alerts"]
    )
    def alerts() -> dict[str, Any]:
        if alerting is None:
            return {"alerts": [], "delivery": {"pending": {}, "held": {}, "history": []}}
        return json_safe({"alerts": alerting.alerts(), "delivery": alerting.delivery()})

    @app.get(
        SILENCES_PATH, response_model=Silences, dependencies=read_deps, responses=read_errors, tags=["alerts"]
    )
    def silences() -> dict[str, Any]:
        now = time.time()
        return {"silences": [_silence_view(s, now) for s in (alerting.silences() if alerting else [])]}

    @app.post(
        SILENCES_PATH,
        response_model=SilenceView,
        dependencies=[auth],
        responses={
            **write_errors,
            **unavailable,
            400: {"model": ErrorBody, "description": "a matcher that does not parse"},
            413: {"model": ErrorBody, "description": f"body over {MAX_BODY} bytes"},
            422: {"model": ErrorBody, "description": "not a SilenceRequest"},
        },
        tags=["alerts"],
        status_code=201,
    )
    async def create_silence(request: Request) -> Response:
        req: SilenceRequest = validate_body(SilenceRequest, await read_body(request, MAX_BODY))
        now = time.time()
        try:
            sil = need().add_silence(req.matchers, now, now + req.duration_s, req.created_by, req.comment)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        except RuntimeError as e:
            raise HTTPException(503, str(e)) from e
        return json_response(_silence_view(sil, now), 201)

    @app.delete(
        f"{SILENCES_PATH}/{{silence_id}}",
        response_model=SilenceView,
        dependencies=[auth],
        responses={
            **write_errors,
            **unavailable,
            404: {"model": ErrorBody, "description": "no active silence with that id"},
        },
        tags=["alerts"],
    )
    def expire_silence(silence_id: Annotated[str, Path(pattern=SILENCE_ID)]) -> dict[str, Any]:
        a = need()
        if not a.expire_silence(silence_id):
            raise HTTPException(404, f"no active silence with id {silence_id}")
        now = time.time()
        return next(_silence_view(s, now) for s in a.silences() if s.id == silence_id)

    @app.post(
        ALERTS_TEST_PATH,
        response_model=AlertTestResult,
        dependencies=[auth],
        responses={
            **write_errors,
            **unavailable,
            404: {"model": ErrorBody, "description": "no receiver of that name"},
            422: {"model": ErrorBody, "description": "not an AlertTestRequest"},
        },
        tags=["alerts"],
    )
    async def test_receiver(request: Request) -> Response:
        req: AlertTestRequest = validate_body(AlertTestRequest, await read_body(request, MAX_BODY))
        a = need()
        if req.receiver not in {r.name for r in a.cfg.receivers}:
            known = [r.name for r in a.cfg.receivers]
            raise HTTPException(404, f"no receiver named {req.receiver!r}; known {known}")
        import asyncio

        # A send may take its receiver's whole timeout: off the event loop.
        return json_response(await asyncio.to_thread(a.send_test, req.receiver))

    return [(SILENCES_PATH, SilenceRequest), (ALERTS_TEST_PATH, AlertTestRequest)]
