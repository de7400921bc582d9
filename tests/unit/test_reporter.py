"""The rank reporter against a real HTTP server on 127.0.0.1: one kept-alive connection, replay
after the daemon was away, nothing lost or sent twice, refusals kept for later."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from milepost.engine.contract.routes import INGEST_PATH
from milepost.engine.instrument import RankInstrument
from milepost.engine.reporter import Reporter

pytestmark = pytest.mark.timeout(60)


class Daemonish:
    """Records every report and the client port of the connection it came on."""

    def __init__(self, port: int = 0, *, close_each: bool = False, refuse_first: int = 0) -> None:
        self.reports: list[dict[str, Any]] = []
        self.connections: set[int] = set()
        self.refuse = refuse_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.connections.add(self.client_address[1])
                assert self.path == INGEST_PATH and self.headers["Authorization"] == "Bearer tok"
                if outer.refuse > 0:
                    outer.refuse -= 1
                    payload, code = b'{"detail": "busy"}', 503
                else:
                    outer.reports += json.loads(body)["reports"]
                    payload, code = b'{"accepted": 1, "control": [], "faults": []}', 200
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if close_each:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def daemonish() -> Iterator[Callable[..., Daemonish]]:
    made: list[Daemonish] = []

    def make(**kw: Any) -> Daemonish:
        made.append(Daemonish(**kw))
        return made[-1]

    yield make
    for d in made:
        d.close()


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def reporter(port: int) -> Reporter:
    return Reporter(
        f"http://127.0.0.1:{port}",
        "tok",
        RankInstrument("trainer", 1),
        attempt=0,
        interval_s=0.02,
        timeout_s=2,
    )


def seqs(d: Daemonish) -> list[int]:
    return [r["seq"] for r in d.reports]


def test_reports_share_one_kept_alive_connection(daemonish: Callable[..., Daemonish]) -> None:
    d = daemonish()
    rep = reporter(d.port).start()
    wait_for(lambda: len(d.reports) >= 20)
    rep.stop()
    assert len(d.connections) == 1
    assert seqs(d) == list(range(1, len(d.reports) + 1))
    assert rep.failures == 0 and rep.dropped == 0


def test_a_server_that_closes_each_connection_loses_nothing(daemonish: Callable[..., Daemonish]) -> None:
    d = daemonish(close_each=True)
    rep = reporter(d.port).start()
    wait_for(lambda: len(d.reports) >= 10)
    rep.stop()
    assert len(d.connections) >= 10  # a new connection each time
    assert seqs(d) == list(range(1, len(d.reports) + 1))


def test_reports_made_while_the_daemon_is_away_are_replayed_in_order(
    daemonish: Callable[..., Daemonish],
) -> None:
    with socket.socket() as s:  # a port with nothing listening yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rep = reporter(port).start()
    wait_for(lambda: rep.failures >= 5)
    assert rep.sent == 0
    d = daemonish(port=port)
    wait_for(lambda: len(d.reports) >= 10)
    rep.stop()
    assert seqs(d) == list(range(1, len(d.reports) + 1))  # the backlog first, nothing twice
    assert rep.dropped == 0


def test_a_refused_post_keeps_its_reports(daemonish: Callable[..., Daemonish]) -> None:
    d = daemonish(refuse_first=3)
    rep = reporter(d.port).start()
    wait_for(lambda: len(d.reports) >= 5)
    rep.stop()
    assert rep.failures >= 3
    assert seqs(d) == list(range(1, len(d.reports) + 1))


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="daemon url='ftp://x': want http://host:port"):
        Reporter("ftp://x", "tok", RankInstrument("trainer", 0), attempt=0)
