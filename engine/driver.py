"""The engine driver: one attempt of a job, as a Ray driver with trainer and rollout actors.

Per step: prompts -> rollout (G samples per prompt) -> reward -> group-normalised
advantages -> train (FSDP2 over the trainer group) -> weight sync (versioned,
checksummed, verified by every rollout worker) -> maybe checkpoint.
On start it resumes from the newest checkpoint whose manifest verifies (skipping
corrupt ones with an event) and checks the state checksum the trainers loaded
against the manifest before it takes a single step.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import step_tracing as tracing
from .actors import ActorFailure, InsufficientSlots, create_trainers, create_workers, gather, take_prewarmed
from .checkpoint import Checkpoint, CheckpointStore
from .cluster import ensure_ray
from .contract.config import JobConfig
from .contract.enums import ControlAction, Role, Severity
from .contract.events import EventKind
from .contract.layout import RunDir
from .control import ControlInbox
from .grpo import group_advantages
from .rollout import WeightSyncError
from .runtime import RankRuntime
from .stack_helper import StackService, current_node_id
from .step_result import STEP_RECORD_KEY, RunResult, StepResult, restore_step_record
from .step_tracing import remote_kwargs
from .task import Task
from .trainer import ResumeError

log = logging.getLogger(__name__)

_SYNC_ATTEMPTS = 3


class Engine:
    """Runs steps ``start+1 .. until_step`` of a job in one attempt."""

    def __init__(
        self,
        cfg: JobConfig,
        run_dir: str | Path,
        *,
        attempt: int = 0,
        world_size: int | None = None,
        elastic: bool = False,
        until_step: int | None = None,
        on_step: Callable[[StepResult], None] | None = None,
        daemon_url: str | None = None,
        token: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.attempt = attempt
        self.world_size = world_size or cfg.trainer.world_size
        if not 1 <= self.world_size <= cfg.trainer.max_world_size:
            raise ValueError(f"world_size={self.world_size}: must be in [1, {cfg.trainer.max_world_size}]")
        self.elastic = elastic
        self.until_step = min(until_step or cfg.run.steps, cfg.run.steps)
        self.on_step = on_step
        self.daemon_url, self.token = daemon_url, token
        self.task = Task(cfg.task)
        self.control = ControlInbox()
        self.rt = RankRuntime(
            role=Role.DRIVER,
            rank=0,
            run_dir=str(self.run_dir),
            attempt=attempt,
            faults=cfg.faults,
            daemon_url=daemon_url,
            token=token,
            report_interval_s=cfg.supervisor.report_interval_s,
            on_response=self.control.on_response,
            telemetry_nice=cfg.supervisor.telemetry_nice,
        )
        self.events, self.inst = self.rt.events, self.rt.inst
        self.store = CheckpointStore(cfg.checkpoint_root(self.run_dir), keep_last=cfg.checkpoint.keep_last)
        self.trainers: list[Any] = []
        self.workers: list[Any] = []
        self.weight_version = -1
        self.last_saved = -1
        self.stopped = False
        self.owners: dict[str, tuple[str, int]] = {}
        self.corrupt_next_sync = False  # fault hook: tamper with the next weight packet in transit
        self.built_ahead = 0  # actors a warm standby had built for this attempt
        self.rank_nodes: dict[tuple[str, int], str] = {}  # (role, rank) -> Ray node id
        self.stack_service: StackService | None = None
        self.on_failure: Callable[[BaseException], None] | None = None  # called once the actors are gone

    # -- actors ---------------------------------------------------------------
    def _start_actors(self) -> None:
        common = {
            "run_dir": str(self.run_dir),
            "attempt": self.attempt,
            "daemon_url": self.daemon_url,
            "token": self.token,
        }
        pre = take_prewarmed(self.attempt, self.world_size)
        if pre is not None:
            self.trainers = pre.trainers
            self.workers = pre.workers or create_workers(self.cfg, common, deferred=False)
            self.owners = {a._actor_id.hex(): (Role.TRAINER, r) for r, a in enumerate(self.trainers)}
            self.owners.update({a._actor_id.hex(): (Role.ROLLOUT, i) for i, a in enumerate(self.workers)})
            ahead = self.trainers + pre.workers
            self._gather([a.start_runtime.remote() for a in ahead], ahead)
            self.built_ahead = len(ahead)
        else:
            self.trainers = create_trainers(self.cfg, self.world_size, common, deferred=False)
            self.workers = create_workers(self.cfg, common, deferred=False)
        self.owners = {a._actor_id.hex(): (Role.TRAINER, r) for r, a in enumerate(self.trainers)}
        self.owners.update({a._actor_id.hex(): (Role.ROLLOUT, i) for i, a in enumerate(self.workers)})
        host, port = self._gather([self.trainers[0].rendezvous_address.remote()], [self.trainers[0]])[0]
        infos = self._gather([t.setup.remote(host, port) for t in self.trainers], self.trainers)
        infos += self._gather([w.info.remote() for w in self.workers], self.workers)
        nt = len(self.trainers)
        self.rank_nodes = {(Role.TRAINER, r): str(i.get("node_id", "")) for r, i in enumerate(infos[:nt])}
        self.rank_nodes.update(
            {(Role.ROLLOUT, w): str(i.get("node_id", "")) for w, i in enumerate(infos[nt:])}
        )
        self.rank_nodes[(Role.DRIVER, 0)] = current_node_id()
        self.events.emit(
            EventKind.ATTEMPT_STARTED,
            f"attempt {self.attempt}: {self.world_size} trainer ranks, {len(self.workers)} rollout workers"
            + (f" ({self.built_ahead} built ahead by the standby)" if self.built_ahead else ""),
            world_size=self.world_size,
            built_ahead=self.built_ahead,
            ranks=infos,
        )

    def _start_stack_service(self) -> None:
        """Per-node stack helpers for the daemon's hang evidence (``engine.stack_helper``)."""
        if not self.daemon_url or not self.cfg.detection.stacks:
            return
        try:
            self.stack_service = StackService(self.run_dir, self.attempt, lambda: self.rank_nodes).start()
        except Exception as e:  # an attempt trains without them; the daemon falls back to its own py-spy
            log.warning("no per-node stack helpers: %r", e)

    def _stop_actors(self, *, graceful: bool) -> None:
        """Graceful: ranks flush their checkpoint and reporters first. Otherwise kill at once:
        after a failure the survivors may sit in a collective with a dead peer."""
        import ray

        if graceful:
            try:
                ray.get([a.shutdown.remote() for a in self.trainers + self.workers], timeout=120)
            except Exception as e:
                log.warning("actor shutdown: %r", e)
        elif self.trainers:
            # Rank 0 commits saves; if it is alive, a save in flight may still land (bounded wait).
            with contextlib.suppress(Exception):
                ray.get(self.trainers[0].wait_checkpoint.remote(5.0), timeout=6.0)
        for a in self.trainers + self.workers:
            ray.kill(a, no_restart=True)
        self.trainers, self.workers = [], []

    def _all_trainers(self, method: str, *args: Any) -> list[Any]:
        return self._gather(
            [getattr(t, method).remote(*args, **remote_kwargs(method)) for t in self.trainers], self.trainers
        )

    def _gather(self, refs: list[Any], actors: list[Any]) -> list[Any]:
        return gather(refs, actors, self.owners)

    # -- resume ---------------------------------------------------------------
    def _resume(self) -> tuple[int, Checkpoint | None, str | None]:
        def skipped(ckpt: Checkpoint, reason: str) -> None:
            self.events.emit(
                EventKind.CHECKPOINT_SKIPPED,
                f"skipping checkpoint: {reason}",
                severity=Severity.WARNING,
                step=ckpt.step,
            )

        ckpt = self.store.find_resumable(on_skip=skipped)
        if ckpt is None:
            return 0, None, None
        loaded = self._all_trainers("load_checkpoint", str(ckpt.path))
        got = {r["state_checksum"] for r in loaded}
        want = ckpt.manifest.get("state_checksum")
        if got != {want}:
            self.events.emit(
                EventKind.RESUME_VERIFICATION_FAILED,
                f"loaded state of step {ckpt.step} has checksum {sorted(got)} but the manifest says {want}",
                severity=Severity.CRITICAL,
                step=ckpt.step,
            )
            raise ResumeError(f"resume from {ckpt.path}: loaded checksum {sorted(got)} != manifest {want}")
        self.events.emit(
            EventKind.RESUME_VERIFIED,
            f"resumed from step {ckpt.step} (saved at world size {ckpt.manifest.get('world_size')}, "
            f"now {self.world_size}); state checksum {str(want)[:12]} verified",
            step=ckpt.step,
            state_checksum=want,
            saved_world_size=ckpt.manifest.get("world_size"),
            world_size=self.world_size,
        )
        return ckpt.step, ckpt, str(want)

    # -- weights --------------------------------------------------------------
    def _sync_weights(self, version: int) -> None:
        import ray

        for attempt in range(1, _SYNC_ATTEMPTS + 1):
            packet = self._all_trainers("export_weights", version)[0]
            if self.corrupt_next_sync:
                self.corrupt_next_sync = False
                name = next(iter(packet["state"]))
                packet["state"][name] = packet["state"][name] + 1e-3
            ref = ray.put(packet)
            try:
                self._gather(
                    [w.update_weights.remote(ref, **remote_kwargs("update_weights")) for w in self.workers],
                    self.workers,
                )
                self.weight_version = version
                return
            except ActorFailure as failure:
                if not isinstance(failure.cause, WeightSyncError):
                    raise
                e = failure.cause
                self.events.emit(
                    EventKind.WEIGHT_SYNC_RETRY,
                    f"weight sync v{version} failed verification (try {attempt}/{_SYNC_ATTEMPTS}): {e}",
                    severity=Severity.WARNING,
                    version=version,
                )
        raise WeightSyncError(f"weight sync v{version} failed verification {_SYNC_ATTEMPTS} times")

    # -- one step -------------------------------------------------------------
    def _rollout(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:

        g = self.cfg.grpo
        prompts = self.task.prompts(self.cfg.run.seed, step, g.prompts_per_step)
        shards = torch.tensor_split(prompts, len(self.workers))
        futures = [
            w.generate.remote(
                step,
                s.repeat_interleave(g.group_size, dim=0),
                self.weight_version,
                **remote_kwargs("generate"),
            )
            for w, s in zip(self.workers, shards, strict=True)
        ]
        outs = self._gather(futures, self.workers)
        responses = torch.cat([o["responses"] for o in outs])
        versions = {o["weight_version"] for o in outs}
        if versions != {self.weight_version}:
            raise RuntimeError(
                f"step {step}: rollout used weight versions {versions}, expected {self.weight_version}"
            )
        full_prompts = prompts.repeat_interleave(g.group_size, dim=0)
        return full_prompts, responses, sum(o["tokens"] for o in outs)

    def _step(self, step: int) -> StepResult:
        t0 = time.perf_counter()
        phases: dict[str, float] = {}

        timed = functools.partial(self._timed, phases)

        self.rt.faults.check(step)
        with self.inst.step(step), tracing.current().span("step", {"milepost.step": step}) as span:
            with timed("rollout"):
                prompts, responses, rollout_tokens = self._rollout(step)
            with timed("reward"):
                rewards = self.task.rewards(prompts, responses)
                adv = group_advantages(rewards, self.cfg.grpo.group_size)
            with timed("train"):
                batch = {"prompts": prompts, "responses": responses, "advantages": adv}
                stats = self._all_trainers("train_step", step, batch)[0]
            with timed("weight_sync"):
                self._sync_weights(step)
            res = StepResult.model_construct(
                step=step,
                reward_mean=rewards.mean().item(),
                reward_std=rewards.std().item(),
                loss=stats["loss"],
                grad_norm=stats["grad_norm"],
                kl=stats["kl"],
                clip_frac=stats["clip_frac"],
                lr=stats["lr"],
                weight_version=self.weight_version,
                rollout_tokens=rollout_tokens,
                train_tokens=stats["train_tokens"],
                step_s=time.perf_counter() - t0,
                phases=dict(phases),
                rollout_samples=int(responses.shape[0]),
                prompt_tokens=int(prompts.numel()),
                trace_id=tracing.trace_id_of(span),
            )
            if self._should_checkpoint(step):
                with timed("checkpoint"):
                    # The manifest keeps this step's record: the commit may land before steps.jsonl's line.
                    self._checkpoint(step, record=res.record(self.attempt))
                res = res.model_copy(update={"step_s": time.perf_counter() - t0, "phases": phases})
        self.rt.publish(
            timings={"step": res.step_s, **phases},
            metrics={"reward_mean": res.reward_mean, "loss": res.loss, "grad_norm": res.grad_norm},
        )
        return res

    @contextmanager
    def _timed(self, phases: dict[str, float], name: str) -> Iterator[None]:
        with self.inst.phase(name), tracing.current().span(name, {"milepost.phase": name}):
            t = time.perf_counter()
            try:
                yield
            finally:
                phases[name] = time.perf_counter() - t

    def _should_checkpoint(self, step: int) -> bool:
        interval = self.cfg.checkpoint.interval
        return step == self.until_step or (interval > 0 and step % interval == 0)

    def _checkpoint(self, step: int, record: dict[str, Any] | None = None) -> None:
        self.last_saved = step
        meta: dict[str, Any] = {
            "weight_version": self.weight_version,
            "data_position": {
                "next_step": step + 1,
                "prompts_consumed": step * self.cfg.grpo.prompts_per_step,
            },
            "rng": {"seed": self.cfg.run.seed, "scheme": "derived from (seed, step, role, rank)"},
            "job": self.cfg.source,
        }
        if record is not None:
            meta[STEP_RECORD_KEY] = record
        self._all_trainers("save_checkpoint", step, meta)

    # -- control from the daemon -------------------------------------------------
    def _apply_control(self, step: int) -> bool:
        """Applies pause/resume/checkpoint/stop requests at a step boundary; True means stop."""
        paused = False
        while True:
            for action in self.control.drain():
                if action == ControlAction.CHECKPOINT:
                    fresh = self.last_saved != step
                    note = "" if fresh else " (already saved at this step)"
                    self.events.emit(
                        EventKind.CHECKPOINT_REQUESTED,
                        f"checkpoint of step {step} on request{note}",
                        step=step,
                    )
                    if fresh:
                        self._checkpoint(step)
                elif action == ControlAction.STOP:
                    if self.last_saved != step:
                        self._checkpoint(step)
                    self.events.emit(
                        EventKind.ATTEMPT_STOPPING, f"stopping after step {step} on request", step=step
                    )
                    return True
                elif action == ControlAction.PAUSE and not paused:
                    paused = True
                    self.inst.set_phase("paused")
                    self.events.emit(EventKind.RUN_PAUSED, f"paused after step {step}", step=step)
                elif action == ControlAction.RESUME and paused:
                    paused = False
                    self.events.emit(EventKind.RUN_RESUMED, f"resumed after step {step}", step=step)
            if not paused:
                self.inst.set_phase("idle")
                return False
            time.sleep(0.2)

    def _choose_world_size(self) -> int:
        """The largest trainer world size the cluster's free slots allow, within [min, max]."""
        import ray

        t = self.cfg.trainer
        slots = int(ray.cluster_resources().get("CPU", 0)) - self.cfg.rollout.workers
        size = min(t.max_world_size, slots)
        if t.backend == "megatron":  # whole tensor x pipeline parallel groups only
            size -= size % self.cfg.megatron.model_parallel_size
        if size < t.min_world_size or size < 1:
            raise InsufficientSlots(
                f"cluster has {slots} trainer slots; trainer.min_world_size={t.min_world_size}"
            )
        if size != t.world_size:
            self.events.emit(
                EventKind.WORLD_SIZE_CHANGED,
                f"cluster has {slots} trainer slots: running at world size {size} "
                f"(configured {t.world_size}, range {t.min_world_size}..{t.max_world_size})",
                severity=Severity.WARNING if size < t.world_size else Severity.INFO,
                world_size=size,
                slots=slots,
            )
        return size

    # -- the attempt ----------------------------------------------------------
    def run(self) -> RunResult:
        import ray

        max_ws = self.cfg.trainer.max_world_size if self.elastic else self.world_size
        started_ray = ensure_ray(self.cfg.ray, needed_cpus=max_ws + self.cfg.rollout.workers)
        ok = False
        try:
            if self.elastic:
                self.world_size = self._choose_world_size()
            self._start_actors()
            self._start_stack_service()
            with tracing.current().span(
                "recovery" if self.attempt else "resume", {"milepost.attempt": self.attempt}
            ):
                start, ckpt, loaded = self._resume()
                self._sync_weights(start)
            if ckpt is not None and restore_step_record(RunDir(self.run_dir).steps, ckpt.manifest):
                log.warning(
                    "step %d: its record was lost after its checkpoint; restored from the manifest", start
                )
            self.last_saved = start
            self.inst.state.step = start
            # Bounded: an attempt of a million steps keeps its newest results, and counts the rest.
            results: deque[StepResult] = deque(maxlen=self.cfg.retention.driver_results)
            final_step = start
            with RunDir(self.run_dir).steps.open("a") as steps_log:
                for step in range(start + 1, self.until_step + 1):
                    res = self._step(step)
                    results.append(res)
                    final_step = step
                    steps_log.write(json.dumps(res.record(self.attempt)) + "\n")
                    steps_log.flush()
                    if self.on_step is not None:
                        self.on_step(res)
                    if self._apply_control(step):
                        self.stopped = True
                        break
            self._all_trainers("wait_checkpoint")
            final = self._all_trainers("full_state_checksum")[0]
            self.events.emit(
                EventKind.ATTEMPT_FINISHED,
                f"attempt {self.attempt} {'stopped at' if self.stopped else 'reached'} step {final_step}",
                step=final_step,
                state_checksum=final,
                stopped=self.stopped,
            )
            ok = True
            return RunResult(
                start_step=start,
                final_step=final_step,
                world_size=self.world_size,
                resumed_from=ckpt.step if ckpt else None,
                loaded_checksum=loaded,
                final_checksum=final,
                steps=list(results),
                steps_run=final_step - start,
            )
        except BaseException as e:
            # Say why first, as soon as no actor can still write (a save in flight has landed):
            # the daemon need not wait for this process's Ray teardown to start the next attempt.
            self._stop_actors(graceful=False)
            if self.on_failure is not None:
                self.on_failure(e)
            raise
        finally:
            if self.stack_service is not None:
                self.stack_service.close()
            self._stop_actors(graceful=ok)
            self.rt.close()
            if started_ray:
                ray.shutdown()
