"""A second OTLP/HTTP receiver for tests: records every POST to /v1/traces on a free loopback port."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class OtlpSink:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.url = ""

    def spans(self) -> list[dict[str, Any]]:
        """Every span received, decoded with the daemon's decoder (protobuf or JSON)."""
        from milepost.daemon.otlp_receiver import decode_json, decode_protobuf

        out: list[dict[str, Any]] = []
        with self.lock:
            reqs = list(self.requests)
        for r in reqs:
            body = r["body"]
            if r["headers"].get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            is_json = r["headers"].get("content-type", "").startswith("application/json")
            out += decode_json(body) if is_json else decode_protobuf(body)
        return out


@contextmanager
def otlp_sink() -> Iterator[OtlpSink]:
    sink = OtlpSink()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 -- the http.server API
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with sink.lock:
                sink.requests.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
