"""Test helpers: a free loopback port, a real uvicorn server on one in a thread, a Prometheus-family
binary (Prometheus, Alertmanager) started on one, and a fake controller."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import uvicorn
from milepost.daemon.store import Store


def free_port() -> int:
    """A loopback port free now, outside Ray's worker port range."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not 10002 <= port <= 19999:  # Ray's worker port range
            return port


def start_prometheus_binary(
    binary: str, config: Path, storage: str, *extra: str, log: IO[Any]
) -> tuple[subprocess.Popen[bytes], str]:
    """Starts Prometheus or Alertmanager (same flags) on a free loopback port; its output goes to ``log``.

    ``storage`` is the whole storage flag (``--storage.tsdb.path=...`` or ``--storage.path=...``).
    """
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", storage, f"--web.listen-address=127.0.0.1:{port}", *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


@contextmanager
def serve(app: Any, *, start_timeout_s: float = 10.0) -> Iterator[str]:
    """Serve ``app`` on a free loopback port; yields its base URL and stops it on exit."""
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so; with proto 0, Nagle
    # plus delayed ACKs add ~40 ms to every keep-alive request.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class AppSlot:
    """An ASGI app that forwards to whichever app a test puts in it: one server per module,
    a fresh app per test (stopping uvicorn costs ~0.2 s, building an app ~0.04 s)."""

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert self.app is not None, "no app in the slot"
        await self.app(scope, receive, send)


class FakeController:
    """A fake of the daemon's controller: a pause/resume/stop state machine, and ingest into the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.state = "RUNNING"
        self.step = 3
        self.actions: list[str] = []
        self.injected: list[dict[str, Any]] = []
        self.fail_with: Exception | None = None

    def status(self) -> dict[str, Any]:
        if self.fail_with is not None:
            raise self.fail_with
        return {
            "run_id": "run-1",
            "name": "tiny",
            "state": self.state,
            "reason": "",
            "step": self.step,
            "target_steps": 12,
            "attempt": 1,
            "world_size": 2,
            "goodput": 0.75,
            "restarts": 1,
            "started_at": 1_700_000_000.0,
            "updated_at": 1_700_000_100.0,
        }

    def goodput(self) -> dict[str, Any]:
        return {
            "goodput": 0.75,
            "wall_s": 100.0,
            "productive_s": 75.0,
            "badput": {
                "startup_s": 10.0,
                "recovery_s": 8.0,
                "lost_progress_s": 4.0,
                "checkpoint_stall_s": 2.0,
                "other_s": 1.0,
            },
        }

    def control(self, action: str) -> dict[str, Any]:
        allowed = {
            "pause": ("RUNNING", "PAUSED"),
            "resume": ("PAUSED", "RUNNING"),
            "stop": (None, "STOPPED"),
            "checkpoint": ("RUNNING", None),
        }
        need, to = allowed[action]
        if self.state == "STOPPED" or (need is not None and self.state != need):
            raise ValueError(f"cannot {action} a {self.state} run")
        self.actions.append(action)
        self.state = to or self.state
        return {"action": action, "accepted": True, "state": self.state}

    def ingest(self, batch: dict[str, Any]) -> dict[str, Any]:
        for r in batch["reports"]:
            self.store.upsert_rank(r["role"], r["rank"], r["attempt"], r)
        return {"accepted": len(batch["reports"]), "control": [], "faults": []}

    def ranks(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for row in self.store.ranks():
            d = row["data"]
            out.append(
                {
                    "role": row["role"],
                    "rank": row["rank"],
                    "attempt": row["attempt"],
                    "host": d.get("host"),
                    "pid": d.get("pid"),
                    "step": d.get("step"),
                    "phase": d.get("phase"),
                    "state": d.get("state"),
                    "heartbeat_age_seconds": now - row["received_at"],
                }
            )
        return out

    def diagnoses(self) -> list[dict[str, Any]]:
        return self.store.diagnoses()

    def inject(self, fault: dict[str, Any]) -> dict[str, Any]:
        if self.state != "RUNNING":
            raise ValueError(f"no attempt is running (state {self.state})")
        self.injected.append(fault)
        return {"accepted": True, "id": len(self.injected), **fault}
