"""The optimizers of the Megatron backend: Megatron's own on CUDA, AdamW with DP all-reduce on CPU."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ...contract.enums import Severity
from ...contract.events import EventKind
from .layout import MegatronLayout, Param


class CpuOptimizer:
    """AdamW over the TP-local parameters: DP all-reduce of gradients, clipping by the global norm."""

    def __init__(self, be: MegatronLayout, gpt: Any) -> None:
        self.be, self.model = be, gpt
        g = be.ctx.cfg.grpo
        self.params = [p.param for p in be.params]
        self.opt = torch.optim.AdamW(self.params, lr=g.lr, betas=(0.9, 0.99), weight_decay=0.0)
        for p in self.params:  # state exists before the first step, so a checkpoint can load into it
            self.opt.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        self.counted = [param_is_not_tensor_parallel_duplicate(p) for p in self.params]

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> float:
        be = self.be
        ps, inst = be.ps, be.ctx.inst
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if be.dp > 1:
            flat = torch.cat([gr.reshape(-1) for gr in grads])
            with inst.collective("all_reduce", group="dp", nbytes=flat.numel() * flat.element_size()):
                dist.all_reduce(flat, group=ps.get_data_parallel_group())
            flat /= be.dp
            off = 0
            for gr in grads:
                gr.copy_(flat[off : off + gr.numel()].view_as(gr))
                off += gr.numel()
        sq = torch.zeros((), dtype=torch.float32)
        for gr, counted in zip(grads, self.counted, strict=True):
            if counted:
                sq += gr.float().pow(2).sum()
        if be.tp * be.pp > 1:
            with inst.collective("all_reduce", group="mp", nbytes=4):
                dist.all_reduce(sq, group=ps.get_model_parallel_group())
        norm = float(sq.sqrt())
        if not math.isfinite(norm):
            # Reduced over the data- and model-parallel groups: every rank skips this update.
            self.zero_grad()
            return norm
        coef = be.ctx.cfg.grpo.max_grad_norm / (norm + 1e-6)
        for p, gr in zip(self.params, grads, strict=True):
            p.grad = gr * coef if coef < 1.0 else gr
        self.opt.step()
        return norm

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def state(self, p: Param) -> dict[str, torch.Tensor]:
        s = self.opt.state[p.param]
        return {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}

    def step_count(self) -> int:
        return int(self.opt.state[self.params[0]]["step"].item())

    def set_step_count(self, n: int) -> None:
        for p in self.params:
            self.opt.state[p]["step"].fill_(float(n))

    def loaded(self) -> None:
        pass


class MegatronOptimizer:
    """Megatron's DDP + optimizer (the distributed optimizer when configured); CUDA only."""

    def __init__(self, be: MegatronLayout, gpt: Any) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        m, g = be.mcfg, be.ctx.cfg.grpo
        self.be = be
        if m.bf16 and not m.use_distributed_optimizer:
            raise ValueError("megatron.bf16=true: needs megatron.use_distributed_optimizer=true")
        ddp_cfg = DistributedDataParallelConfig(
            # A non-finite gradient fails the step (and the attempt resumes from a checkpoint)
            # instead of reaching the weights.
            check_for_nan_in_grad=True,
            grad_reduce_in_fp32=m.grad_reduce_in_fp32,
            overlap_grad_reduce=m.overlap_grad_reduce,
            use_distributed_optimizer=m.use_distributed_optimizer,
        )
        self.model = DistributedDataParallel(config=be.tcfg, ddp_config=ddp_cfg, module=gpt)
        be.tcfg.finalize_model_grads_func = finalize_model_grads
        be.tcfg.no_sync_func = self.model.no_sync
        self.opt = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=g.lr,
                weight_decay=0.0,
                adam_beta1=0.9,
                adam_beta2=0.99,
                adam_eps=1e-8,
                clip_grad=g.max_grad_norm,
                bf16=m.bf16,
                params_dtype=torch.bfloat16 if m.bf16 else torch.float32,
                use_distributed_optimizer=m.use_distributed_optimizer,
            ),
            [self.model],
        )
        self.distributed = m.use_distributed_optimizer
        self._steps = 0
        self._inner = self._inner_optimizers()
        # Optimizer state exists before the first step, so a checkpoint can load into it (what
        # Adam would create lazily; torch's Adam also wants its per-parameter "step").
        for inner in self._inner:
            opt = inner.optimizer
            torch_adam = type(opt).__module__.startswith("torch.optim")
            for group in opt.param_groups:
                for q in group["params"]:
                    st = opt.state[q]
                    if len(st) == 0:
                        st["exp_avg"] = torch.zeros_like(q.data)
                        st["exp_avg_sq"] = torch.zeros_like(q.data)
                        if torch_adam:
                            st["step"] = torch.tensor(0.0)

    def _inner_optimizers(self) -> list[Any]:
        return list(getattr(self.opt, "chained_optimizers", None) or [self.opt])

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        self.opt.zero_grad()

    def step(self) -> float:
        ok, grad_norm, _ = self.opt.step()
        if not ok:
            self.be.ctx.events.emit(
                EventKind.OPTIMIZER_STEP_SKIPPED,
                "Megatron optimizer skipped a step",
                severity=Severity.WARNING,
            )
        self._steps += 1
        return float(grad_norm or 0.0)

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    # Per-parameter state as TP-local tensors of the parameter's shape. With the distributed
    # optimizer each data-parallel rank holds a flat range of each parameter: the ranges are
    # summed over the data-parallel group into whole tensors (and split back on load).
    def _locate(self, param: torch.nn.Parameter) -> tuple[Any, Any] | None:
        for inner in self._inner:
            if self.distributed and param in getattr(inner, "model_param_group_index_map", {}):
                return inner, inner._get_model_param_range_map(param)["param"]
            if not self.distributed:
                for group in inner.optimizer.param_groups:
                    if any(q is param for q in group["params"]):
                        return inner, None
        return None

    def state(self, p: Param) -> dict[str, torch.Tensor]:
        param = p.param
        found = self._locate(param)
        out = {
            k: torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            for k in ("exp_avg", "exp_avg_sq")
        }
        if found is not None:
            inner, rng = found
            if rng is None:
                st = inner.optimizer.state[param]
                return {k: st[k] for k in out}
            tensors = inner._get_main_param_and_optimizer_states(param)
            for k in out:
                out[k].view(-1)[rng.start : rng.end].copy_(tensors[k])
        if self.distributed and self.be.dp > 1:
            for k in out:
                with self.be.ctx.inst.collective("all_reduce", group="dp"):
                    dist.all_reduce(
                        out[k], group=self.be.ps.get_data_parallel_group(with_context_parallel=True)
                    )
        if self.distributed:
            self._pending = getattr(self, "_pending", {})
            self._pending[id(param)] = out
        return out

    def step_count(self) -> int:
        return self._steps

    def set_step_count(self, n: int) -> None:
        self._steps = n
        for inner in self._inner:
            for group in inner.optimizer.param_groups:
                if "step" in group:
                    group["step"] = n
            for st in inner.optimizer.state.values():
                if "step" in st:
                    st["step"] = torch.full_like(st["step"], float(n)) if torch.is_tensor(st["step"]) else n

    def loaded(self) -> None:
        """After a checkpoint load: scatter the loaded whole tensors back to the distributed optimizer."""
        if self.distributed:
            pending = getattr(self, "_pending", {})
            for p in self.be.params:
                found = self._locate(p.param)
                if found is None or id(p.param) not in pending:
                    continue
                inner, rng = found
                tensors = inner._get_main_param_and_optimizer_states(p.param)
                whole = pending[id(p.param)]
                for k in ("exp_avg", "exp_avg_sq"):
                    tensors[k].copy_(whole[k].view(-1)[rng.start : rng.end])
                tensors["param"].copy_(p.param.detach().view(-1)[rng.start : rng.end].float())
            self._pending = {}
        for inner in self._inner:
            reload = getattr(inner, "reload_model_params", None)
            if reload is not None and not self.distributed:
                reload()
