"""Megatron checkpoint state and weight export, both over the canonical full layout.

Checkpoints: a DCP state dict of DTensors over a (pp, dp, tp) device mesh, so DCP reshards
when the TP size or the world size changes; the same layout gives the TP-invariant
checksum. Weights for the rollout side are gathered on global rank 0 and mapped to
``Policy`` names (embedded rollout) or HF Llama names (SGLang).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ...weights import state_checksum
from . import convert as conv
from .layout import MegatronLayout, Param


class CheckpointState(MegatronLayout):
    """The state and export part of ``MegatronBackend``."""

    _mesh: Any

    def _to_rollout_layout(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mc = self.ctx.cfg.model
        if self.weight_format == "hf_llama":
            return conv.megatron_to_hf_llama(full, mc, groups=self.groups, vocab=self.vocab)
        return conv.megatron_to_policy(full, mc, self.vocab)

    # -- weights and state ------------------------------------------------------
    def export_full_weights(self) -> dict[str, torch.Tensor] | None:
        full = self._gather_full([(p, p.param) for p in self.params])
        return None if full is None else self._to_rollout_layout(full)

    def full_state_checksum(self) -> str:
        weights = self._gather_full([(p, p.param) for p in self.params])
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            moments[key] = self._gather_full([(p, self.optim.state(p)[key]) for p in self.params])
        digest = [""]
        if self.ctx.rank == 0:
            assert weights is not None
            state = {
                "model": self._to_rollout_layout(weights),
                "optim": {
                    "step": int(self.optim.step_count()),
                    **{k: self._to_rollout_layout(v or {}) for k, v in moments.items()},
                },
            }
            digest = [state_checksum(state)]
        dist.broadcast_object_list(digest, src=0)
        return str(digest[0])

    def _device_mesh(self) -> Any:
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(
                self.ctx.device.type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp")
            )
            self._mesh = mesh["dp", "tp"]  # this rank's pipeline stage
        return self._mesh

    def _dtensors(self, p: Param, local: torch.Tensor) -> dict[str, Any]:
        """DCP entries of one parameter-shaped tensor: DTensor shards of its canonical layout."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh = self._device_mesh()
        place = [Replicate(), Replicate() if p.tp_dim is None else Shard(p.tp_dim)]
        if p.gated:  # [gate_r; up_r] locally: two entries, so the layout does not depend on the TP size
            # Copies: DCP's async stager cannot stage two views of one storage.
            gate, up = (t.clone() for t in local.chunk(2, dim=0))
            return {
                ".gate": DTensor.from_local(gate, mesh, place, run_check=False),
                ".up": DTensor.from_local(up, mesh, place, run_check=False),
            }
        return {"": DTensor.from_local(local, mesh, place, run_check=False)}

    def sharded_state_dict(self) -> dict[str, Any]:
        model: dict[str, Any] = {}
        optim: dict[str, Any] = {}
        for p in self.params:
            for suffix, dt in self._dtensors(p, p.param.data).items():
                model[p.name + suffix] = dt
            for key, t in self.optim.state(p).items():
                for suffix, dt in self._dtensors(p, t).items():
                    optim[f"{key}.{p.name}{suffix}"] = dt
        optim["step"] = torch.tensor(float(self.optim.step_count()))
        return {"model": model, "optim": optim}

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        def local(d: dict[str, Any], key: str, p: Param) -> torch.Tensor:
            if p.gated:
                return torch.cat([d[key + ".gate"].to_local(), d[key + ".up"].to_local()])
            return d[key].to_local()

        with torch.no_grad():
            for p in self.params:
                src = local(state["model"], p.name, p)
                if src.data_ptr() != p.param.data.data_ptr():
                    p.param.data.copy_(src)
                for key, t in self.optim.state(p).items():
                    src = local(state["optim"], f"{key}.{p.name}", p)
                    if src.data_ptr() != t.data_ptr():
                        t.copy_(src)
            self.optim.set_step_count(int(state["optim"]["step"].item()))
        self.optim.loaded()
