"""Trainer rank: one member of the torch.distributed group, training through a backend.

Runs inside a Ray actor (the driver wraps this class with ``ray.remote``) or any process
that sets it up with a master address. gloo on CPU, NCCL when CUDA is present.
The backend (``trainer.backend``: FSDP2 or Megatron-core, engine/backends/) owns the model,
the optimizer and their parallelism; this class owns the process group, checkpoints
(DCP, committed atomically), events and the instrument. Every collective this class
issues itself goes through the rank's instrument.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from . import collectives
from .backends.base import BackendContext, TrainBackend
from .backends.factory import make_backend
from .checkpoint import CheckpointStore
from .contract.config import JobConfig
from .contract.enums import FaultKind, Role, Severity
from .contract.events import EventKind
from .faults import flip_bytes
from .runtime import RuntimeActor, RuntimeArgs
from .stack_helper import current_node_id
from .weights import state_checksum

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_address() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except Exception:  # outside Ray the rank is on loopback
        pass
    return "127.0.0.1"


class TrainerRank(RuntimeActor):
    def __init__(
        self,
        cfg: JobConfig,
        *,
        rank: int,
        world_size: int,
        run_dir: str,
        **runtime: Unpack[RuntimeArgs],
    ) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.run_dir, self.attempt = run_dir, runtime.get("attempt", 0)
        self.open_runtime(cfg, Role.TRAINER, rank, run_dir, **runtime)
        self.store = CheckpointStore(cfg.checkpoint_root(run_dir), keep_last=cfg.checkpoint.keep_last)
        self._pending: Future[Any] | None = None
        self._commit_lock = threading.Lock()
        self.backend: TrainBackend = make_backend(cfg.trainer.backend)

    # -- set-up ---------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        host = node_address()
        return host, free_port(host)

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        cfg = self.cfg
        torch.set_num_threads(cfg.trainer.threads_per_rank)
        cuda = torch.cuda.is_available()
        timeout = timedelta(seconds=cfg.trainer.collective_timeout_s)
        # Before the process group exists: the flight recorder is configured at creation.
        collectives.enable_flight_recorder()
        self.collectives = collectives.install(self.inst)
        self.rt.on_stuck = self._dump_flight_recorder
        self.rt.faults.hooks[FaultKind.SKIP_COLLECTIVE] = lambda: setattr(
            self.collectives, "skip_next", "all_reduce"
        )
        if self.rank == 0:
            self.rt.faults.hooks[FaultKind.CORRUPT_CHECKPOINT] = self._corrupt_newest_checkpoint
        if hasattr(self.backend, "poison_next"):
            self.rt.faults.hooks[FaultKind.NAN] = lambda: setattr(self.backend, "poison_next", True)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timeout,
        )
        # A group of its own for checkpoint I/O, so an async save never interleaves with training collectives.
        self.ckpt_pg = dist.new_group(backend="gloo", timeout=timeout)
        collectives.name_group(self.ckpt_pg, "checkpoint")
        ctx = BackendContext(
            cfg=cfg,
            rank=self.rank,
            world_size=self.world_size,
            device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
            timeout=timeout,
            inst=self.inst,
            events=self.events,
        )
        layout = self.backend.setup(ctx)
        self.inst.set_phase("idle")
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": current_node_id(),
            "backend": dist.get_backend(),
            "train_backend": self.backend.name,
            **layout,
        }

    # -- training -------------------------------------------------------------
    def train_step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step per GRPO minibatch over this rank's share of the global batch."""
        t0 = time.perf_counter()
        with self.inst.step(step), self.inst.phase("train"):
            # Inside the phase: a stalled or frozen rank is seen where its peers are.
            self.rt.faults.check(step)
            stats = self.backend.train_step(step, batch)
            self.rt.faults.slow_down(time.perf_counter() - t0)
        stats["train_s"] = time.perf_counter() - t0
        self.rt.publish(timings={"train": stats["train_s"]}, metrics={"loss": stats["loss"]})
        return stats

    # -- weights --------------------------------------------------------------
    def export_weights(self, version: int) -> dict[str, Any] | None:
        """Gathers the full weights (a collective); rank 0 returns them with their checksum."""
        with self.inst.phase("weight_sync"):
            full = self.backend.export_full_weights()
        if self.rank != 0:
            return None
        assert full is not None
        return {
            "version": version,
            "checksum": state_checksum(full),
            "format": self.backend.weight_format,
            "state": full,
        }

    def full_state_checksum(self) -> str:
        """Checksum of the full model + optimizer state (a collective; every rank returns the same)."""
        return self.backend.full_state_checksum()

    def _corrupt_newest_checkpoint(self) -> None:
        """Fault: flip bytes of the largest file of the newest committed checkpoint (resume must skip it)."""
        self.wait_checkpoint()
        newest = next(iter(self.store.committed()), None)
        if newest is None:
            return
        victim = max(
            (p for p in newest.path.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size
        )
        offset, count = flip_bytes(victim)
        self.events.emit(
            EventKind.CHECKPOINT_CORRUPTED,
            f"flipped {count} bytes at offset {offset} of {victim.name} of {newest.path.name}",
            step=newest.step,
        )

    def _dump_flight_recorder(self) -> dict[str, Any]:
        return collectives.dump_flight_recorder()

    # -- checkpoints ----------------------------------------------------------
    def wait_checkpoint(self, timeout_s: float = 600.0) -> None:
        """Blocks until the save in flight (if any) is written and committed."""
        if self._pending is not None:
            self._pending.result(timeout=timeout_s)
            self._pending = None
            with self._commit_lock:
                pass  # the commit callback runs under this lock; wait for it to finish

    def save_checkpoint(self, step: int, meta: dict[str, Any]) -> dict[str, Any]:
        """Starts a sharded DCP save of step ``step``; one save in flight, committed atomically by rank 0."""
        with self.inst.phase("checkpoint"):
            t0 = time.perf_counter()
            self.wait_checkpoint()
            checksum = self.full_state_checksum()
            state = self.backend.sharded_state_dict()
            tmp = self.store.tmp_dir(step)
            if self.rank == 0:
                self.store.begin(step)
            dist.barrier(group=self.ckpt_pg)
            meta = {
                **meta,
                "world_size": self.world_size,
                "backend": self.cfg.trainer.backend,
                "state_checksum": checksum,
                "attempt": self.attempt,
            }
            if self.cfg.checkpoint.async_save:
                fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.ckpt_pg)
                assert isinstance(fut, Future)
                self._pending = fut
                if self.rank == 0:
                    # Hold the lock from now on so wait_checkpoint() also waits for the commit.
                    self._commit_lock.acquire()
                    fut.add_done_callback(lambda f: self._commit(step, meta, f, t0))
            else:
                dcp.save(state, checkpoint_id=str(tmp), process_group=self.ckpt_pg)
                if self.rank == 0:
                    self._commit_lock.acquire()
                    done: Future[Any] = Future()
                    done.set_result(None)
                    self._commit(step, meta, done, t0)
            stall = time.perf_counter() - t0
        return {"step": step, "stall_s": stall, "state_checksum": checksum}

    def _commit(self, step: int, meta: dict[str, Any], fut: Future[Any], t0: float) -> None:
        try:
            if (exc := fut.exception()) is not None:
                self.events.emit(
                    EventKind.CHECKPOINT_FAILED,
                    f"save of step {step} failed: {exc!r}",
                    severity=Severity.ERROR,
                    step=step,
                )
                return
            ckpt = self.store.commit(step, meta)
            self.events.emit(
                EventKind.CHECKPOINT_COMMITTED,
                f"checkpoint of step {step} committed ({len(ckpt.manifest['files'])} files)",
                step=step,
                path=str(ckpt.path),
                total_s=round(time.perf_counter() - t0, 4),
                state_checksum=meta["state_checksum"],
                world_size=self.world_size,
            )
        except Exception as e:
            # A failed commit leaves the previous checkpoint as the newest; say so and keep training.
            self.events.emit(
                EventKind.CHECKPOINT_FAILED,
                f"commit of step {step} failed: {e!r}",
                severity=Severity.ERROR,
                step=step,
            )
        finally:
            self._commit_lock.release()

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Loads a committed checkpoint (any saved world size: DCP reshards); returns the loaded checksum."""
        with self.inst.phase("resume"):
            state = self.backend.sharded_state_dict()
            # DCP loads in place into these (resharding to this world size and layout).
            dcp.load(state, checkpoint_id=path, process_group=self.ckpt_pg)
            self.backend.load_sharded_state_dict(state)
            checksum = self.full_state_checksum()
        return {"path": path, "state_checksum": checksum}

    def shutdown(self) -> None:
        try:
            self.wait_checkpoint()
        finally:
            self.backend.close()
            self.rt.close()
            if dist.is_initialized():
                dist.destroy_process_group()
