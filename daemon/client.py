"""Typed HTTP client of the daemon's API.

The dashboard and ``milepost status`` import only this module (and :mod:`milepost.daemon.auth`):
httpx, no torch, no Ray.
"""

from __future__ import annotations

import json
import os
from types import TracebackType
from typing import Any, TypedDict, Unpack
from urllib.parse import quote

import httpx
from milepost.daemon.auth import read_token
from milepost.engine.contract.enums import Role
from milepost.engine.contract.layout import RunDir
from milepost.engine.contract.routes import (
    ALERTS_PATH,
    ALERTS_TEST_PATH,
    API,
    COLLECTIVES_PATH,
    FAULTS_PATH,
    HEALTHZ_PATH,
    RANK_MATRIX_PATH,
    SILENCES_PATH,
    STATUS_PATH,
    control_path,
    diagnosis_evidence_path,
    diagnosis_timeline_path,
    silence_path,
    step_trace_path,
)


class EventQuery(TypedDict, total=False):
    """The filters of ``GET /api/v1/events``."""

    since_id: int
    limit: int
    kind: str
    attempt: int
    newest_first: bool


class DaemonError(Exception):
    """A non-2xx answer from the daemon (status_code is the HTTP status)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"daemon answered {status_code}: {message}" if status_code else message)
        self.status_code = status_code
        self.message = message


class DaemonUnreachable(DaemonError):
    """No daemon to talk to: no daemon.json, or nothing answers at its URL (status_code 0)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


def read_daemon_file(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``<run_dir>/daemon.json`` (url, pid, started_at); DaemonUnreachable if absent or unreadable."""
    path = RunDir(run_dir).daemon_file
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DaemonUnreachable(f"no {path}: is a daemon running for this run dir?") from None
    except (OSError, ValueError) as e:
        raise DaemonUnreachable(f"cannot read {path}: {e}") from e
    if not isinstance(info, dict) or not isinstance(info.get("url"), str):
        raise DaemonUnreachable(f"{path} has no 'url'")
    return info


def _error_message(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        return resp.text or resp.reason_phrase
    if isinstance(detail, list):  # FastAPI validation errors: one entry per bad field
        return "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail if isinstance(d, dict)
        )
    return str(detail)


class DaemonClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # trust_env=False: an HTTP(S)_PROXY meant for the internet must not swallow loopback calls.
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, trust_env=False)

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike[str], timeout_s: float = 5.0) -> DaemonClient:
        """A client for the daemon of ``run_dir``; never creates a token file."""
        return cls(read_daemon_file(run_dir)["url"], token=read_token(run_dir), timeout_s=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _request(
        self, method: str, path: str, params: dict[str, Any] | None = None, body: dict[str, Any] | None = None
    ) -> Any:
        try:
            resp = self._http.request(method, path, params=params, json=body)
        except httpx.TransportError as e:
            raise DaemonUnreachable(f"cannot reach the daemon at {self.url}: {e}") from e
        if not resp.is_success:
            raise DaemonError(resp.status_code, _error_message(resp))
        try:
            return resp.json()
        except ValueError as e:
            raise DaemonError(resp.status_code, f"not JSON: {resp.text[:200]!r}") from e

    # -- reads ----------------------------------------------------------------
    def healthz(self) -> dict[str, Any]:
        return dict(self._request("GET", HEALTHZ_PATH))

    def status(self) -> dict[str, Any]:
        return dict(self._request("GET", STATUS_PATH))

    def goodput(self) -> dict[str, Any]:
        return dict(self._request("GET", f"{API}/goodput"))

    def ranks(self) -> list[dict[str, Any]]:
        return list(self._request("GET", f"{API}/ranks")["ranks"])

    def attempts(self) -> list[dict[str, Any]]:
        return list(self._request("GET", f"{API}/attempts")["attempts"])

    def events(self, **query: Unpack[EventQuery]) -> list[dict[str, Any]]:
        """The run's events, filtered as ``GET /api/v1/events`` is (``since_id``, ``limit``, ...)."""
        params: dict[str, Any] = {"since_id": 0, "limit": 200, **query}
        if params.pop("newest_first", False):
            params["newest_first"] = "true"
        return list(self._request("GET", f"{API}/events", params)["events"])

    def steps(self, since: int = 0, limit: int = 10000) -> list[dict[str, Any]]:
        return list(self._request("GET", f"{API}/steps", {"since": since, "limit": limit})["steps"])

    def checkpoints(self) -> list[dict[str, Any]]:
        return list(self._request("GET", f"{API}/checkpoints")["checkpoints"])

    def diagnoses(self) -> list[dict[str, Any]]:
        return list(self._request("GET", f"{API}/diagnoses")["diagnoses"])

    def alerts(self) -> dict[str, Any]:
        """``{"alerts": [...], "delivery": {"pending", "held", "history"}}``."""
        return dict(self._request("GET", ALERTS_PATH))

    def silences(self) -> list[dict[str, Any]]:
        return list(self._request("GET", SILENCES_PATH)["silences"])

    def rank_matrix(
        self,
        *,
        role: str = Role.TRAINER,
        steps: int = 200,
        offset: int = 0,
        limit: int = 64,
        sort: str = "rank",
    ) -> dict[str, Any]:
        """Compute seconds per rank x step for one page of ranks (``sort``: rank | score | last)."""
        params = {"role": role, "steps": steps, "offset": offset, "limit": limit, "sort": sort}
        return dict(self._request("GET", RANK_MATRIX_PATH, params))

    def collectives(self, window_s: float = 600.0) -> dict[str, Any]:
        """``in_flight`` now and per-(op, group) ``series`` buckets over the last ``window_s``."""
        return dict(self._request("GET", COLLECTIVES_PATH, {"window_s": window_s}))

    def traces(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self._request("GET", f"{API}/traces", {"limit": limit})["traces"])

    def step_trace(self, step: int) -> dict[str, Any]:
        """``{trace_id, spans}`` of one step; DaemonError 404 when none of its spans are held."""
        return dict(self._request("GET", step_trace_path(int(step))))

    def evidence(self, diag_id: int) -> dict[str, Any]:
        return dict(self._request("GET", diagnosis_evidence_path(int(diag_id))))

    def recovery_timeline(self, diag_id: int) -> list[dict[str, Any]]:
        return list(self._request("GET", diagnosis_timeline_path(int(diag_id)))["points"])

    # -- writes ---------------------------------------------------------------
    def silence(
        self, matchers: list[str], duration_s: float, *, created_by: str = "", comment: str = ""
    ) -> dict[str, Any]:
        """Mutes alerts matching every matcher (``alertname=CollectiveHang``) for ``duration_s``."""
        body = {"matchers": matchers, "duration_s": duration_s, "created_by": created_by, "comment": comment}
        return dict(self._request("POST", SILENCES_PATH, body=body))

    def unsilence(self, silence_id: str) -> dict[str, Any]:
        """Expires a silence now; DaemonError 404 when no active silence has that id."""
        return dict(self._request("DELETE", silence_path(quote(silence_id, safe=""))))

    def test_receiver(self, receiver: str) -> dict[str, Any]:
        """Sends a test alert to one receiver; ``{"status": ok|retry|fail, "answer", "reason"}``."""
        return dict(self._request("POST", ALERTS_TEST_PATH, body={"receiver": receiver}))

    def inject(
        self, kind: str, *, role: str = Role.TRAINER, rank: int = 0, step: int = 0, factor: float = 1.5
    ) -> dict[str, Any]:
        """Queues a fault for a rank of the running attempt; DaemonError 409 when none runs."""
        body = {"kind": kind, "role": role, "rank": rank, "step": step, "factor": factor}
        return dict(self._request("POST", FAULTS_PATH, body=body))

    def control(self, action: str) -> dict[str, Any]:
        """pause | resume | stop | checkpoint; DaemonError 409 when the run's state forbids it."""
        return dict(self._request("POST", control_path(quote(action, safe=""))))
