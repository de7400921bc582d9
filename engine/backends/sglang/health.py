"""Health across a worker's SGLang servers: warm-up grace, debounced failures, restarts, re-sync."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ...contract.config import SGLangConfig
from ...contract.enums import Severity
from ...contract.events import EventKind
from ...events import EventSink
from .client import SGLangClient
from .servers import Launcher, ServerProcess, ServerSpec

STARTING, HEALTHY, UNHEALTHY, DEAD = "starting", "healthy", "unhealthy", "dead"
HISTORY_KEEP = 100  # state changes kept per server (``[retention] sglang_history``)


@dataclass
class Server:
    spec: ServerSpec | None  # None: attached by URL (milepost does not own its process)
    client: SGLangClient
    proc: ServerProcess | None = None
    state: str = STARTING
    started_at: float = 0.0
    failures: int = 0
    version: int = -1  # weight version this server holds; -1: unknown / none pushed
    restarts: int = 0
    ever_healthy: bool = False
    # Bounded: a server that flaps for weeks keeps its newest state changes.
    history: deque[str] = field(default_factory=lambda: deque(maxlen=HISTORY_KEEP))

    @property
    def url(self) -> str:
        return self.client.url

    def serving(self, version: int) -> bool:
        return self.state == HEALTHY and self.version == version


class ServerManager:
    """Launch/attach, health checks with warm-up grace and debounced failures, restart, re-sync.

    ``tick()`` runs one round of checks; the worker calls it from a background thread every
    ``health_interval_s`` and before it generates. All state changes happen under ``lock``.
    """

    def __init__(
        self,
        cfg: SGLangConfig,
        *,
        events: EventSink,
        push: Callable[[Server], None],
        launcher: Launcher | None = None,
        model_path: Callable[[], str | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        history_keep: int = HISTORY_KEEP,
    ) -> None:
        self.cfg, self.events, self.push, self.clock = cfg, events, push, clock
        self.history_keep = history_keep
        self.launcher = launcher
        self.model_path = model_path  # the newest weights on disk, for (re)launches
        self.servers: list[Server] = []
        self.lock = threading.RLock()

    def attach(self, urls: list[str]) -> None:
        for url in urls:
            client = SGLangClient(url, timeout_s=self.cfg.request_timeout_s)
            self.servers.append(
                Server(spec=None, client=client, started_at=self.clock(), history=self._history())
            )

    def launch(self, specs: list[ServerSpec]) -> None:
        assert self.launcher is not None
        for spec in specs:
            proc = self.launcher(spec)
            client = SGLangClient(proc.url, timeout_s=self.cfg.request_timeout_s)
            self.servers.append(
                Server(spec=spec, client=client, proc=proc, started_at=self.clock(), history=self._history())
            )
            self.events.emit(
                EventKind.SGLANG_SERVER_LAUNCHED, f"SGLang server {proc.url} launched", url=proc.url
            )

    def _history(self) -> deque[str]:
        return deque(maxlen=self.history_keep)

    def _set(self, s: Server, state: str, why: str) -> None:
        if s.state != state:
            s.history.append(f"{s.state}->{state}: {why}")
            s.state = state

    def tick(self) -> None:
        with self.lock:
            for s in self.servers:
                self._check(s)

    def _check(self, s: Server) -> None:
        cfg, now = self.cfg, self.clock()
        if s.proc is not None and (code := s.proc.poll()) is not None:
            self._dead(s, f"process exited with code {code}")
            return
        ok = s.client.health_generate(cfg.check_timeout_s)
        if ok:
            s.failures = 0
            if s.state != HEALTHY:
                was = s.state
                self._set(s, HEALTHY, "health_generate answered")
                s.ever_healthy = True
                if was == DEAD:
                    self.events.emit(
                        EventKind.SGLANG_SERVER_BACK, f"SGLang server {s.url} answers again", url=s.url
                    )
            return
        warming = not s.ever_healthy and now - s.started_at < cfg.startup_grace_s
        if warming:
            return  # a server still starting up (loading, compiling, capturing graphs) is not failing
        s.failures += 1
        if s.failures < cfg.failure_threshold:
            self._set(s, UNHEALTHY, f"{s.failures} failed check(s)")
            return
        self._dead(
            s, f"{s.failures} consecutive failed checks", f"{s.failures} consecutive failed health checks"
        )

    def _dead(self, s: Server, why: str, detail: str | None = None) -> None:
        """Declares ``s`` dead (once, with an event) and restarts it if milepost launched it."""
        if s.state != DEAD:
            self._set(s, DEAD, why)
            self.events.emit(
                EventKind.SGLANG_SERVER_DEAD,
                f"SGLang server {s.url}: {detail or why}",
                severity=Severity.ERROR,
                url=s.url,
            )
        self._restart(s)

    def _restart(self, s: Server) -> None:
        if s.spec is None or self.launcher is None:
            s.version = -1  # an attached server that comes back is re-synced before it serves
            return
        if s.restarts >= self.cfg.max_restarts:
            return
        if s.proc is not None:
            s.proc.terminate()
        s.restarts += 1
        if (path := self.model_path()) is not None:
            s.spec = replace(s.spec, model_path=path)
        s.proc = self.launcher(s.spec)
        s.client.close()
        s.client = SGLangClient(s.proc.url, timeout_s=self.cfg.request_timeout_s)
        s.started_at, s.failures, s.version, s.ever_healthy = self.clock(), 0, -1, False
        self._set(s, STARTING, f"restart {s.restarts}")
        self.events.emit(
            EventKind.SGLANG_SERVER_RESTARTED,
            f"SGLang server {s.url} restarted ({s.restarts}/{self.cfg.max_restarts})",
            severity=Severity.WARNING,
            url=s.url,
            restarts=s.restarts,
        )

    def resync(self, version: int) -> None:
        """Pushes the current weights to every healthy server that does not hold ``version``."""
        if version < 0:
            return
        with self.lock:
            for s in self.servers:
                if s.state == HEALTHY and s.version != version:
                    self.push(s)

    def status(self) -> list[dict[str, Any]]:
        with self.lock:
            return [
                {
                    "url": s.url,
                    "state": s.state,
                    "weight_version": s.version,
                    "restarts": s.restarts,
                    "failures": s.failures,
                    "launched": s.spec is not None,
                }
                for s in self.servers
            ]

    def close(self) -> None:
        with self.lock:
            for s in self.servers:
                if s.proc is not None:
                    s.proc.terminate()
                s.client.close()
