"""The API's gate for every request that writes: the token first, then a size cap, then a deadline.

An ASGI middleware, so every route gets it by default, routes added later included, and
before FastAPI reads a single byte of a body (FastAPI parses a declared body before any
dependency runs: a token check in a dependency came after a body of any size was in memory).

- a write (any method but GET, HEAD, OPTIONS) without the run's bearer token: 401, body unread;
- a body declared (Content-Length) over the route's cap: 413, body unread; a streamed one
  (chunked) is cut off with 413 as soon as it passes the cap;
- a body that does not arrive within ``body_timeout_s``: 408 (a slow client holds no more
  than that; it never holds the event loop, whose other requests go on meanwhile);
- more than ``max_in_flight`` requests at once: 503 with Retry-After, before any work.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import tokens_equal

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_BODY_CAP = 64 * 1024  # control, faults, silences: small JSON bodies


@dataclass(frozen=True)
class WriteLimits:
    body_caps: Mapping[str, int] = field(default_factory=dict)  # path -> cap, over the default
    default_body_cap: int = DEFAULT_BODY_CAP
    body_timeout_s: float = 30.0
    max_in_flight: int = 1024  # ranks post one at a time each: room for a thousand-rank job

    def cap(self, path: str) -> int:
        return self.body_caps.get(path, self.default_body_cap)


class _Refuse(HTTPException):
    """Raised from the body's ``receive``: an HTTPException, so FastAPI's body parsing passes it on as is."""


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    # Close the connection: the client's unread body must not be parsed as its next request.
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class WriteGuard:
    def __init__(self, app: ASGIApp, *, token: str, limits: WriteLimits) -> None:
        if not token:
            raise ValueError("WriteGuard: an empty token would let anyone write")
        self.app, self.token, self.cfg = app, token, limits
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.cfg.max_in_flight:
            await _answer(send, 503, "too many requests in flight", [(b"retry-after", b"1")])
            return
        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method", "GET") in READ_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not tokens_equal(given.strip(), self.token):
            await _answer(send, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")])
            return
        cap = self.cfg.cap(scope.get("path", ""))
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.strip().isdigit() and int(declared) > cap:
            await _answer(send, 413, f"body over {cap} bytes", [])
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.body_timeout_s
        received = 0
        done = False  # the whole body is in: later receives (a disconnect) are not timed
        started = False

        async def capped_receive() -> Message:
            nonlocal received, done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise _Refuse(408, f"body not received within {self.cfg.body_timeout_s:g}s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise _Refuse(413, f"body over {cap} bytes")
                done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except _Refuse as e:  # raised where no exception handler stood between (e.g. a bare ASGI route)
            if started:
                raise
            await _answer(send, e.status_code, str(e.detail), [])
