"""The API's write gate on a real uvicorn server on 127.0.0.1, spoken to over raw sockets: the token
before the body, body caps answered before the body is sent, slow clients that block no one."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from milepost.daemon.api import create_app
from milepost.daemon.api_guard import WriteLimits
from milepost.daemon.store import Store

from tests.servers import FakeController, serve

pytestmark = pytest.mark.timeout(60)

TOKEN = "guard-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = WriteLimits(body_timeout_s=2.0, max_in_flight=64)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run_dir: Path = tmp_path_factory.mktemp("run")
    store = Store(run_dir)
    store.ensure_run(run_id="r", name="g", job="job.toml", run_dir=str(run_dir), target_steps=10)
    store.set_run_state("RUNNING")
    app = create_app(store, FakeController(store), token=TOKEN, require_token_for_reads=False, limits=LIMITS)
    with serve(app) as u:
        yield u
    store.close()


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    return s


def _status(s: socket.socket) -> int:
    """The status of the answer; the socket times out (5 s) if none comes."""
    head = b""
    while b"\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, f"connection closed without an answer: {head!r}"
        head += chunk
    return int(head.split(b" ", 2)[1])


def _post_head(path: str, length: int | None, *, token: str | None = TOKEN) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_write_without_the_token_is_refused_before_its_body_is_read(url: str, token: str | None) -> None:
    with _connect(url) as s:
        s.sendall(_post_head("/api/v1/faults", 10**9, token=token))  # a gigabyte declared, none sent
        assert _status(s) == 401


def test_a_declared_oversized_body_is_413_before_it_is_sent(url: str) -> None:
    with _connect(url) as s:
        s.sendall(_post_head("/api/v1/faults", 10**9))
        assert _status(s) == 413


def test_a_streamed_oversized_body_is_cut_off_with_413(url: str) -> None:
    with _connect(url) as s:
        s.sendall(_post_head("/api/v1/faults", None))
        chunk = b"[" + b"1," * 8191 + b"1]"  # 16 KiB of valid-looking JSON per chunk
        for _ in range(8):  # 128 KiB in all, over the 64 KiB cap of a control write
            s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        assert _status(s) == 413


def test_slow_clients_block_no_one_and_are_dropped_after_the_body_deadline(url: str) -> None:
    slow = []
    for _ in range(10):  # half a request each: headers that never end, or a body that never comes
        s = _connect(url)
        s.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
        s = _connect(url)
        s.sendall(_post_head("/api/v1/faults", 100) + b'{"kind"')
        slow.append(s)
    try:
        with httpx.Client(base_url=url, timeout=5) as http:
            t0 = time.monotonic()
            assert http.get("/api/v1/status").status_code == 200
            assert http.post("/api/v1/ingest", json={"reports": []}, headers=AUTH).status_code == 200
            assert time.monotonic() - t0 < 2.0
        assert _status(slow[1]) == 408  # its body did not come within body_timeout_s
    finally:
        for s in slow:
            s.close()


def test_too_many_requests_in_flight_are_503(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure_run(run_id="r", name="g", job="job.toml", run_dir=str(tmp_path), target_steps=10)
    limits = WriteLimits(body_timeout_s=10.0, max_in_flight=2)
    app = create_app(store, FakeController(store), token=TOKEN, require_token_for_reads=False, limits=limits)
    with serve(app) as u:
        held = [_connect(u) for _ in range(2)]
        try:
            for s in held:  # two writes inside the app, waiting for their bodies
                s.sendall(_post_head("/api/v1/faults", 100))
            deadline = time.monotonic() + 5
            while (r := httpx.get(f"{u}/healthz", timeout=5)).status_code != 503:
                assert time.monotonic() < deadline, "the bound never applied"
                time.sleep(0.05)
            assert r.headers["retry-after"] == "1"
        finally:
            for s in held:
                s.close()
    store.close()
