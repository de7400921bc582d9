"""Weights for SGLang servers: the HF directory they load, and pushing a version to one server.

``WeightPush`` is mixed into the rollout worker: it pushes the worker's current weights
(``state``, ``version``) by ``sglang.weight_update``: "disk" (an HF directory written once
per version), "tensor" (shared-memory handles, same host) or "distributed" (NCCL broadcast).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from ...contract.config import JobConfig, SGLangConfig
from ...contract.enums import Severity
from ...contract.events import EventKind
from ...events import EventSink
from ...task import Task
from ..megatron.convert import hf_llama_config
from .client import SGLangError, serialize_named_tensors
from .health import Server


def write_hf_dir(path: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """An HF model directory SGLang loads: config.json + pytorch_model.bin (written, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    torch.save({k: v.contiguous() for k, v in state.items()}, tmp / "pytorch_model.bin")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


class WeightPush:
    """Pushes the worker's current weights to one server and records the version it then holds."""

    cfg: JobConfig
    scfg: SGLangConfig
    index: int
    task: Task
    events: EventSink
    version: int
    state: dict[str, torch.Tensor] | None
    weight_root: Path
    weight_path: Path | None  # directory holding self.version, once written
    _groups: dict[str, Any]  # weight-update process group per server URL ("distributed")

    def _hf_config(self) -> dict[str, Any]:
        m = self.cfg.megatron
        return hf_llama_config(
            self.cfg.model,
            groups=m.num_query_groups or self.cfg.model.n_heads,
            vocab=self.task.vocab_size,
            rope_theta=m.rotary_base,
            rms_norm_eps=m.norm_epsilon,
        )

    def _write_weights(self) -> Path:
        assert self.state is not None
        if self.weight_path is None:
            path = self.weight_root / f"w{self.index}" / f"v{self.version:08d}"
            self.weight_path = write_hf_dir(path, self.state, self._hf_config())
            # Keep the previous version too: a server may still be loading it.
            for old in sorted((self.weight_root / f"w{self.index}").glob("v*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        return self.weight_path

    def _push(self, s: Server) -> None:
        """Sends the current weights to one server and records the version it then holds."""
        assert self.state is not None
        mode = self.scfg.weight_update
        try:
            if mode == "disk":
                s.client.update_weights_from_disk(str(self._write_weights()), version=self.version)
            elif mode == "tensor":
                named = list(self.state.items())
                tp = s.spec.tp_size if s.spec is not None else self.scfg.tp_size
                s.client.update_weights_from_tensor(
                    [serialize_named_tensors(named)] * tp, version=self.version
                )
            else:
                self._push_distributed(s)
        except (SGLangError, httpx.HTTPError) as e:
            self._push_failed(s, f"SGLang server {s.url}: weights v{self.version} not loaded: {e}")
            return
        reported = s.client.weight_version()
        if (
            reported is not None
            and reported != str(self.version)
            and s.client.set_weight_version(self.version)
        ):
            reported = s.client.weight_version()
        if reported is not None and reported != str(self.version):
            self._push_failed(
                s, f"SGLang server {s.url} reports weight version {reported} after loading v{self.version}"
            )
            return
        previous, s.version = s.version, self.version
        self.events.emit(
            EventKind.SGLANG_WEIGHTS_LOADED,
            f"SGLang server {s.url} holds weights v{self.version} ({mode}; had v{previous})",
            url=s.url,
            version=self.version,
            previous=previous,
        )

    def _push_failed(self, s: Server, message: str) -> None:
        s.version = -1  # unknown: the next resync pushes again
        self.events.emit(
            EventKind.SGLANG_WEIGHT_PUSH_FAILED,
            message,
            severity=Severity.ERROR,
            url=s.url,
            version=self.version,
        )

    def _push_distributed(self, s: Server) -> None:
        """NCCL broadcast from this process (rank 0) to the server's ranks; needs CUDA here."""
        assert self.state is not None
        group = self._groups.get(s.url)
        if group is None:
            group = self._groups[s.url] = self._init_group(s)
        names = list(self.state)
        tensors = [self.state[n] for n in names]
        # The server posts its receives when the request arrives; the broadcasts run meanwhile.
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(
                s.client.update_weights_from_distributed,
                names,
                [str(t.dtype).removeprefix("torch.") for t in tensors],
                [list(t.shape) for t in tensors],
                group_name=f"milepost-w{self.index}",
                version=self.version,
            )
            for t in tensors:
                self._broadcast(group, t)
            fut.result()

    def _broadcast(self, group: Any, tensor: torch.Tensor) -> None:
        torch.distributed.broadcast(tensor.to("cuda", non_blocking=True), src=0, group=group)

    def _init_group(self, s: Server) -> Any:
        """Joins a NCCL group with the server's ranks (this process is rank 0), as SGLang's RL
        integrations do: POST /init_weights_update_group while creating our side of the group."""
        if not torch.cuda.is_available():
            raise SGLangError("sglang.weight_update='distributed' needs CUDA in the rollout worker")
        from sglang.srt.utils import init_custom_process_group

        tp = s.spec.tp_size if s.spec is not None else self.scfg.tp_size
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = int(sock.getsockname()[1])
        addr = socket.gethostbyname(socket.gethostname())
        name = f"milepost-w{self.index}"
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(
                s.client.init_weights_update_group,
                master_address=addr,
                master_port=port,
                rank_offset=1,
                world_size=tp + 1,
                group_name=name,
            )
            group = init_custom_process_group(
                backend="nccl", init_method=f"tcp://{addr}:{port}", world_size=tp + 1, rank=0, group_name=name
            )
            fut.result()
        return group
