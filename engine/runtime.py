"""What every process of an attempt carries: events, the instrument, faults, the reporter."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypedDict

from .contract.config import FaultSpec
from .contract.enums import FaultKind, RankStatus, Role
from .contract.layout import RunDir
from .contract.process import TOKEN_ENV
from .events import EventSink
from .faults import FaultInjector
from .instrument import RankInstrument
from .rank_telemetry import RankTelemetry
from .reporter import Reporter

if TYPE_CHECKING:
    from typing_extensions import Unpack


class RankRuntime:
    def __init__(
        self,
        *,
        role: str,
        rank: int,
        run_dir: str,
        attempt: int,
        faults: list[FaultSpec],
        daemon_url: str | None,
        token: str | None = None,
        report_interval_s: float = 1.0,
        on_response: Any = None,
        start: bool = True,
        telemetry_nice: int = 0,
    ) -> None:
        self.events = EventSink(
            run_dir, attempt=attempt, role=role, rank=None if role == Role.DRIVER else rank
        )
        self.inst = RankInstrument(role, rank)
        self.faults = FaultInjector(faults, role=role, rank=rank, attempt=attempt, events=self.events)
        self.run_dir, self.attempt, self.role, self.rank = run_dir, attempt, role, rank
        self.on_stuck: Callable[[], dict[str, Any]] | None = (
            None  # flight-recorder dump, set by trainer ranks
        )
        self.stuck_after_s = 2.0
        self._dumped: set[tuple[str, int]] = set()
        self._seen_faults: set[int] = set()
        self._user_on_response = on_response
        self._daemon_url, self._token, self._interval_s = daemon_url, token, report_interval_s
        self._nice = telemetry_nice
        self.reporter: Reporter | None = None
        self.telemetry: RankTelemetry | None = None
        if start:
            self.start()

    def start(self) -> RankRuntime:
        """Starts reporting to the daemon and tracing (idempotent).

        A process built ahead of its attempt (a warm standby's actors) starts these only
        when the attempt begins, so nothing is reported for an attempt not yet running.
        """
        if self.telemetry is not None:
            return self
        if self._daemon_url:
            self.reporter = Reporter(
                self._daemon_url,
                self._token or os.environ.get(TOKEN_ENV, ""),
                self.inst,
                attempt=self.attempt,
                interval_s=self._interval_s,
                on_response=self._on_response,
                on_tick=self._on_tick,
                nice=self._nice,
                token_source=self._run_token,
            ).start()
        self.telemetry = RankTelemetry(
            role=self.role,
            rank=self.rank,
            attempt=self.attempt,
            daemon_url=self._daemon_url,
            token=self._token or os.environ.get(TOKEN_ENV),
            reporter=self.reporter,
        )
        return self

    def _run_token(self) -> str | None:
        """The run's token file as it is now (a daemon restarted without $MILEPOST_TOKEN may have made a new one)."""
        try:
            return RunDir(self.run_dir).token.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    @classmethod
    def for_job(
        cls,
        cfg: Any,
        *,
        role: str,
        rank: int,
        run_dir: str,
        attempt: int,
        daemon_url: str | None,
        token: str | None,
        on_response: Any = None,
        start: bool = True,
    ) -> RankRuntime:
        """The runtime of one process of a job's attempt (faults and report interval from the job)."""
        return cls(
            role=role,
            rank=rank,
            run_dir=run_dir,
            attempt=attempt,
            faults=cfg.faults,
            daemon_url=daemon_url,
            token=token,
            report_interval_s=cfg.supervisor.report_interval_s,
            on_response=on_response,
            start=start,
            telemetry_nice=cfg.supervisor.telemetry_nice,
        )

    def _on_response(self, resp: dict[str, Any]) -> None:
        for f in resp.get("faults") or []:
            fid = int(f.get("id", 0))
            if fid in self._seen_faults or f.get("role") != self.role or int(f.get("rank", -1)) != self.rank:
                continue
            self._seen_faults.add(fid)
            spec = FaultSpec(
                kind=f["kind"],
                role=f["role"],
                rank=int(f["rank"]),
                step=int(f.get("step", 0)),
                factor=float(f.get("factor", 1.5)),
            )
            self.faults.add(spec)
            if spec.kind == FaultKind.HANG and spec.step == 0 and self.role != Role.DRIVER:
                self.faults.check(self.inst.state.step)  # freeze now, wherever the rank is
        if self._user_on_response is not None:
            self._user_on_response(resp)

    def _on_tick(self) -> None:
        """Reporter thread: a collective open too long gets this rank's flight recorder dumped once."""
        if self.on_stuck is None:
            return
        now = time.time()
        for rec in list(self.inst.state.open_collectives.values()):
            key = (rec.group, rec.seq)
            if now - rec.enter_ts > self.stuck_after_s and key not in self._dumped:
                self._dumped.add(key)
                path = RunDir(self.run_dir).flight_recorder_dump(
                    self.attempt, self.role, self.rank, rec.group, rec.seq
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                dump = {
                    "role": self.role,
                    "rank": self.rank,
                    "attempt": self.attempt,
                    "stuck": rec.__dict__,
                    "flight_recorder": self.on_stuck(),
                }
                path.write_text(json.dumps(dump, default=str, indent=1))

    def publish(
        self, *, timings: dict[str, float] | None = None, metrics: dict[str, float] | None = None
    ) -> None:
        """Records the last step's figures; the reporter's next heartbeat carries them (never blocks).

        No report per step: per-step figures that must not be missed travel as histories
        (compute per step, collective counters) in every report.
        """
        if self.reporter is None:
            return
        if timings is not None:
            self.reporter.timings = timings
        if metrics is not None:
            self.reporter.metrics = metrics

    def close(self) -> None:
        if self.telemetry is not None:
            self.telemetry.close()
        if self.reporter is not None:
            self.reporter.status = RankStatus.EXITED
            self.reporter.stop()


class RuntimeArgs(TypedDict, total=False):
    """The keywords the driver passes every actor's constructor besides its role's own."""

    attempt: int  # 0 unless given
    daemon_url: str | None
    token: str | None
    deferred: bool  # built ahead by a warm standby: no reports until ``start_runtime``


class RuntimeActor:
    """Mixed into actor classes: ``open_runtime`` wires an actor's runtime, ``start_runtime``
    begins the reporting of an actor built ahead."""

    rt: RankRuntime
    events: EventSink
    inst: RankInstrument

    def open_runtime(
        self, cfg: Any, role: str, rank: int, run_dir: str, **runtime: Unpack[RuntimeArgs]
    ) -> None:
        """Builds ``rt`` (and ``events``, ``inst``) from the runtime keywords the driver passes."""
        self.rt = RankRuntime.for_job(
            cfg,
            role=role,
            rank=rank,
            run_dir=run_dir,
            attempt=runtime.get("attempt", 0),
            daemon_url=runtime.get("daemon_url"),
            token=runtime.get("token"),
            # Built ahead by a warm standby: reports once its attempt begins.
            start=not runtime.get("deferred", False),
        )
        self.events, self.inst = self.rt.events, self.rt.inst

    def start_runtime(self) -> None:
        self.rt.start()
