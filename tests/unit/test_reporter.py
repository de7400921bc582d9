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

    def __init__(
        self,
        port: int = 0,
        *,
        close_each: bool = False,
        refuse_first: int = 0,
        judge: Callable[[list[dict[str, Any]], str], int] | None = None,
    ) -> None:
        """``judge(reports, authorization)``: the status to answer (200 records the reports)."""
        self.reports: list[dict[str, Any]] = []
        self.connections: set[int] = set()
        self.refuse = refuse_first
        self.judged: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.connections.add(self.client_address[1])
                assert self.path == INGEST_PATH
                got = json.loads(body)["reports"]
                status = judge(got, self.headers["Authorization"]) if judge else 200
                outer.judged.append(status)
                assert judge or self.headers["Authorization"] == "Bearer tok"
                if status != 200:
                    payload, code = b'{"detail": "refused"}', status
                elif outer.refuse > 0:
                    outer.refuse -= 1
                    payload, code = b'{"detail": "busy"}', 503
                else:
                    outer.reports += got
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


def test_a_batch_refused_as_invalid_is_dropped_and_later_reports_still_arrive(
    daemonish: Callable[..., Daemonish],
) -> None:
    """A 422 (e.g. a non-finite number in a report) must not stop every later heartbeat."""
    d = daemonish(judge=lambda reports, _auth: 422 if reports[0]["seq"] == 1 else 200)
    rep = reporter(d.port).start()
    wait_for(lambda: len(d.reports) >= 5)
    rep.stop()
    assert d.judged[0] == 422 and d.judged.count(422) == 1  # refused once, never resent
    assert rep.rejected >= 1 and 1 not in seqs(d)
    assert seqs(d) == sorted(seqs(d))


def test_a_401_makes_the_reporter_read_the_runs_token_again(daemonish: Callable[..., Daemonish]) -> None:
    """A daemon restarted with another token: the rank picks up the new one instead of failing forever."""
    d = daemonish(judge=lambda _reports, auth: 200 if auth == "Bearer new" else 401)
    rep = Reporter(
        f"http://127.0.0.1:{d.port}",
        "old",
        RankInstrument("trainer", 1),
        attempt=0,
        interval_s=0.02,
        timeout_s=2,
        token_source=lambda: "new",
    ).start()
    wait_for(lambda: len(d.reports) >= 5)
    rep.stop()
    assert rep.token == "new" and rep.rejected == 0
    assert seqs(d) == list(range(1, len(d.reports) + 1))  # the batch refused for its token came through
