"""Trainer rank: one member of the torch.distributed group, the policy sharded with FSDP2.

Runs inside a Ray actor (the driver wraps this class with ``ray.remote``) or any process
that sets it up with a master address. gloo on CPU, NCCL when CUDA is present.
Every collective this class issues itself goes through the rank's instrument.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .checkpoint import CheckpointStore
from .config import JobConfig
from .grpo import policy_loss, response_logprobs
from .model import Policy, build_policy
from .runtime import RankRuntime
from .task import Task
from .weights import state_checksum

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
    except Exception:  # noqa: S110 -- outside Ray the rank is on loopback
        pass
    return "127.0.0.1"


class TrainerRank:
    def __init__(
        self,
        cfg: JobConfig,
        *,
        rank: int,
        world_size: int,
        run_dir: str,
        attempt: int = 0,
        daemon_url: str | None = None,
        token: str | None = None,
    ) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.run_dir, self.attempt = run_dir, attempt
        self.rt = RankRuntime(
            role="trainer",
            rank=rank,
            run_dir=run_dir,
            attempt=attempt,
            faults=cfg.faults,
            daemon_url=daemon_url,
            token=token,
            report_interval_s=cfg.supervisor.report_interval_s,
        )
        self.events, self.inst = self.rt.events, self.rt.inst
        self.store = CheckpointStore(cfg.checkpoint_root(run_dir), keep_last=cfg.checkpoint.keep_last)
        self._pending: Future[Any] | None = None
        self._commit_lock = threading.Lock()
        # Set by setup(); Any because FSDP2 turns the Policy into a dynamic subclass.
        self.model: Any = None
        self.optim: Any = None

    # -- set-up ---------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        host = node_address()
        return host, free_port(host)

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        cfg = self.cfg
        torch.set_num_threads(cfg.trainer.threads_per_rank)
        cuda = torch.cuda.is_available()
        timeout = timedelta(seconds=cfg.trainer.collective_timeout_s)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timeout,
        )
        # A group of its own for checkpoint I/O, so an async save never interleaves with training collectives.
        self.ckpt_pg = dist.new_group(backend="gloo", timeout=timeout)
        device = "cuda" if cuda else "cpu"
        mesh = init_device_mesh(device, (self.world_size,), mesh_dim_names=("dp",))
        self.task = Task(cfg.task)
        model = build_policy(cfg.model, self.task.vocab_size, cfg.run.seed).to(device)
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.optim = torch.optim.AdamW(
            model.parameters(), lr=cfg.grpo.lr, betas=(0.9, 0.99), weight_decay=0.0
        )
        self.ref: Policy | None = None
        if cfg.grpo.kl_coef > 0:
            self.ref = build_policy(cfg.model, self.task.vocab_size, cfg.run.seed).to(device).eval()
            self.ref.requires_grad_(False)
        self.inst.set_phase("idle")
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "backend": dist.get_backend(),
        }

    # -- training -------------------------------------------------------------
    def train_step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step per minibatch over this rank's share of the global batch."""
        assert self.model is not None and self.optim is not None
        cfg = self.cfg.grpo
        prompts, responses, adv = batch["prompts"], batch["responses"], batch["advantages"]
        n, resp_len = responses.shape
        self.rt.faults.check(step)
        t0 = time.perf_counter()
        with self.inst.step(step), self.inst.phase("train"):
            # This rank's share of each minibatch; old log-probs for all of them in one pass.
            parts = [
                torch.tensor_split(mb, self.world_size)[self.rank]
                for mb in torch.tensor_split(torch.arange(n), cfg.minibatches)
            ]
            mine = torch.cat(parts)
            with torch.no_grad():
                old_logp = response_logprobs(self.model, prompts[mine], responses[mine])
                ref_logp = response_logprobs(self.ref, prompts[mine], responses[mine]) if self.ref else None
            totals = torch.zeros(
                5, dtype=torch.float64
            )  # loss*tokens, clipped tokens, kl*tokens, tokens, grad_norm
            offset = 0
            for local in parts:
                idx = slice(offset, offset + len(local))
                offset += len(local)
                global_tokens = (n // cfg.minibatches) * resp_len
                new_logp = response_logprobs(self.model, prompts[local], responses[local])
                loss, stats = policy_loss(
                    new_logp,
                    old_logp[idx],
                    adv[local],
                    clip_eps=cfg.clip_eps,
                    kl_coef=cfg.kl_coef,
                    ref_logp=ref_logp[idx] if ref_logp is not None else None,
                    token_count=global_tokens,
                )
                self.optim.zero_grad(set_to_none=True)
                # FSDP2 averages gradients over ranks; the loss is already a share of the global mean.
                (loss * self.world_size).backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                self.optim.step()
                local_tokens = len(local) * resp_len
                totals += torch.tensor(
                    [
                        stats["loss"] * local_tokens,
                        stats["clip_frac"] * local_tokens,
                        stats["kl"] * local_tokens,
                        local_tokens,
                        float(grad_norm) / self.world_size,
                    ],
                    dtype=torch.float64,
                )
            with self.inst.collective(
                "all_reduce", group="world", nbytes=totals.numel() * 8, dtype="float64"
            ):
                dist.all_reduce(totals)
        tokens = max(totals[3].item(), 1.0)
        return {
            "loss": totals[0].item() / tokens,
            "clip_frac": totals[1].item() / tokens,
            "kl": totals[2].item() / tokens,
            "grad_norm": totals[4].item() / cfg.minibatches,
            "train_tokens": totals[3].item(),
            "lr": float(self.optim.param_groups[0]["lr"]),
            "train_s": time.perf_counter() - t0,
        }
        self.rt.publish(timings={"train": stats["train_s"]}, metrics={"loss": stats["loss"]})
        return stats

    # -- weights --------------------------------------------------------------
    def export_weights(self, version: int) -> dict[str, Any] | None:
        """Gathers the full weights (a collective); rank 0 returns them with their checksum."""
        with self.inst.phase("weight_sync"), self.inst.collective("all_gather", group="world"):
            full = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        if self.rank != 0:
            return None
        return {"version": version, "checksum": state_checksum(full), "state": full}

    def full_state_checksum(self) -> str:
        """Checksum of the full model + optimizer state (a collective; every rank returns the same)."""
        with self.inst.collective("all_gather", group="world"):
            msd, osd = get_state_dict(
                self.model, self.optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        digest = [state_checksum({"model": msd, "optim": osd}) if self.rank == 0 else ""]
        dist.broadcast_object_list(digest, src=0)
        return str(digest[0])

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
            msd, osd = get_state_dict(self.model, self.optim)
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
            state = {"model": msd, "optim": osd}
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
                    "checkpoint_failed", f"save of step {step} failed: {exc!r}", severity="error", step=step
                )
                return
            ckpt = self.store.commit(step, meta)
            self.events.emit(
                "checkpoint_committed",
                f"checkpoint of step {step} committed ({len(ckpt.manifest['files'])} files)",
                step=step,
                path=str(ckpt.path),
                total_s=round(time.perf_counter() - t0, 4),
                state_checksum=meta["state_checksum"],
            )
        except Exception as e:
            # A failed commit leaves the previous checkpoint as the newest; say so and keep training.
            self.events.emit(
                "checkpoint_failed", f"commit of step {step} failed: {e!r}", severity="error", step=step
            )
        finally:
            self._commit_lock.release()

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Loads a committed checkpoint (any saved world size: DCP reshards); returns the loaded checksum."""
        with self.inst.phase("resume"):
            msd, osd = get_state_dict(self.model, self.optim)
            # DCP loads in place into these (resharding to this world size).
            dcp.load({"model": msd, "optim": osd}, checkpoint_id=path, process_group=self.ckpt_pg)
            set_state_dict(self.model, self.optim, model_state_dict=msd, optim_state_dict=osd)
            checksum = self.full_state_checksum()
        return {"path": path, "state_checksum": checksum}

    def shutdown(self) -> None:
        try:
            self.wait_checkpoint()
        finally:
            self.rt.close()
            if dist.is_initialized():
                dist.destroy_process_group()
