"""The SGLang rollout worker: one Ray actor per ``rollout.workers``, a few SGLang servers each.

It launches its servers (or attaches to given URLs), checks them from a background thread,
pushes every weight version to each of them and splits generation across the servers that
hold the version the driver expects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch

from ...contract.config import JobConfig
from ...contract.enums import Severity
from ...contract.events import EventKind
from ...rollout import RolloutWorkerBase, StaleWeightsError
from ...runtime import RuntimeArgs
from .client import SGLangError
from .health import HEALTHY, STARTING, UNHEALTHY, Server, ServerManager
from .servers import Launcher, ServerSpec, default_launcher
from .weights import WeightPush

if TYPE_CHECKING:
    from typing_extensions import Unpack


class SGLangRolloutWorker(WeightPush, RolloutWorkerBase):
    """The rollout protocol (update_weights, generate, health) over SGLang servers."""

    weight_format = "hf_llama"
    format_note = "SGLang serves 'hf_llama'"

    def __init__(
        self,
        cfg: JobConfig,
        *,
        index: int,
        run_dir: str,
        launcher: Launcher | None = None,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        **runtime: Unpack[RuntimeArgs],
    ) -> None:
        super().__init__(cfg, index=index, run_dir=run_dir, **runtime)
        self.scfg = s = cfg.sglang
        self.run_dir = Path(run_dir)
        self.state: dict[str, torch.Tensor] | None = None
        self.weight_root = Path(s.weight_dir) if s.weight_dir else self.run_dir / "sglang_weights"
        self.weight_path: Path | None = None
        self._groups: dict[str, Any] = {}
        workers = cfg.rollout.workers
        self.launch_mode = not s.urls
        self.manager = ServerManager(
            s,
            events=self.events,
            push=self._push,
            launcher=(
                launcher or default_launcher(s, self.run_dir / "logs", attempt=runtime.get("attempt", 0))
            )
            if self.launch_mode
            else None,
            model_path=lambda: str(self._write_weights()) if self.state is not None else None,
            clock=clock,
            history_keep=cfg.retention.sglang_history,
        )
        if s.urls:
            self.manager.attach(s.urls[index::workers])
        elif s.model_path:
            self.manager.launch(self._specs(s.model_path))
        # else: launched with the first weights the trainer sends (update_weights)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._health_loop, name="sglang-health", daemon=True)
            self._thread.start()

    def _specs(self, model_path: str) -> list[ServerSpec]:
        s, n = self.scfg, self.scfg.servers_per_worker
        return [
            ServerSpec(
                worker=self.index,
                index=j,
                host=s.host,
                port=s.port_base + self.index * n + j,
                tp_size=s.tp_size,
                base_gpu_id=s.base_gpu_id + (self.index * n + j) * s.tp_size,
                model_path=model_path,
                seed=self.cfg.run.seed + self.index * n + j,
            )
            for j in range(n)
        ]

    def _health_loop(self) -> None:
        while not self._stop.wait(self.scfg.health_interval_s):
            try:
                self.manager.tick()
                self.manager.resync(self.version)
            except Exception as e:  # the loop must survive anything a server does
                self.events.emit(
                    EventKind.SGLANG_HEALTH_ERROR, f"health round failed: {e!r}", severity=Severity.WARNING
                )

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "backend": "sglang",
            "servers": [s["url"] for s in self.manager.status()],
        }

    # -- weights ----------------------------------------------------------------
    def _load_weights(self, version: int, checksum: str, state: dict[str, torch.Tensor]) -> None:
        with self.manager.lock:
            self.version, self.checksum, self.state = version, checksum, state
            self.weight_path = None
            if self.launch_mode and not self.manager.servers:
                # No model path given: the servers start from the trainer's first weights.
                self.manager.launch(self._specs(str(self._write_weights())))
            # Servers not up now get these weights once they are (ServerManager.resync).
            for s in self.manager.servers:
                if s.state == HEALTHY:
                    self._push(s)

    def _sync_report(self) -> dict[str, Any]:
        return {"servers": self.manager.status()}

    # -- generation ---------------------------------------------------------------
    def _eligible(self, version: int, deadline: float) -> list[Server]:
        while True:
            self.manager.tick()
            self.manager.resync(self.version)
            with self.manager.lock:
                ready = [s for s in self.manager.servers if s.serving(version)]
                coming = [s for s in self.manager.servers if s.state in (STARTING, UNHEALTHY)]
            if ready or not coming or time.monotonic() > deadline:
                return ready
            time.sleep(min(1.0, self.scfg.health_interval_s))

    def _sample(
        self, step: int, prompts: torch.Tensor, expected_version: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g, r = self.cfg.grpo, self.task.response_len
        params = {
            "max_new_tokens": r,
            "min_new_tokens": r,
            "ignore_eos": True,
            "temperature": g.temperature,
            "top_p": g.top_p,
        }
        rows = prompts.tolist()
        outputs: list[dict[str, Any] | None] = [None] * len(rows)
        deadline = time.monotonic() + self.scfg.request_timeout_s
        pending = list(range(len(rows)))
        while pending:
            servers = self._eligible(self.version, deadline)
            if not servers:
                raise SGLangError(
                    f"rollout {self.index}: no SGLang server holds weights v{self.version}: {self.manager.status()}"
                )
            shards = [pending[i :: len(servers)] for i in range(len(servers))]
            failed: list[int] = []
            for s, shard in zip(servers, shards, strict=False):
                if not shard:
                    continue
                try:
                    outs = s.client.generate([rows[i] for i in shard], params)
                except (SGLangError, httpx.HTTPError) as e:
                    with self.manager.lock:
                        s.failures += 1
                        self.manager._set(s, UNHEALTHY, f"generate failed: {e}")
                    self.events.emit(
                        EventKind.SGLANG_GENERATE_FAILED,
                        f"SGLang server {s.url}: {e}",
                        severity=Severity.WARNING,
                        url=s.url,
                    )
                    failed += shard
                    continue
                for i, out in zip(shard, outs, strict=True):
                    served = (out.get("meta_info") or {}).get("weight_version")
                    if served is not None and str(served) != str(expected_version):
                        msg = (
                            f"rollout {self.index}: SGLang server {s.url} generated with weight version "
                            f"{served}, expected v{expected_version}"
                        )
                        self.events.emit(EventKind.STALE_WEIGHTS, msg, severity=Severity.ERROR, step=step)
                        raise StaleWeightsError(msg)
                    outputs[i] = out
            pending = failed
        return self._collect(outputs, r)

    def _collect(self, outputs: list[dict[str, Any] | None], r: int) -> tuple[torch.Tensor, torch.Tensor]:
        responses = torch.empty(len(outputs), r, dtype=torch.long)
        logprobs = torch.zeros(len(outputs), r, dtype=torch.float32)
        vocab = self.task.vocab_size
        for i, out in enumerate(outputs):
            assert out is not None
            ids = list(out.get("output_ids") or [])
            if len(ids) != r:
                raise SGLangError(f"rollout {self.index}: SGLang returned {len(ids)} tokens, expected {r}")
            if any(not 0 <= t < vocab for t in ids):
                raise SGLangError(
                    f"rollout {self.index}: SGLang returned token ids outside [0, {vocab}): {ids}"
                )
            responses[i] = torch.tensor(ids)
            lps = (out.get("meta_info") or {}).get("output_token_logprobs") or []
            if len(lps) == r:
                logprobs[i] = torch.tensor([float(x[0]) for x in lps])
        return responses, logprobs

    def health(self) -> dict[str, Any]:
        servers = self.manager.status()
        ok = any(s["state"] == HEALTHY and s["weight_version"] == self.version for s in servers)
        return {"ok": ok, "version": self.version, "checksum": self.checksum, "servers": servers}

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.manager.close()
        super().shutdown()
