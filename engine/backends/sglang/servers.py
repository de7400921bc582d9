"""SGLang server processes: what to launch (``ServerSpec``) and ``python -m sglang.launch_server``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ...contract.config import SGLangConfig
from ...contract.identity import ProcessRecord


@dataclass
class ServerSpec:
    worker: int
    index: int
    host: str
    port: int
    tp_size: int
    base_gpu_id: int
    model_path: str
    seed: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class ServerProcess(Protocol):
    url: str

    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...


Launcher = Callable[[ServerSpec], ServerProcess]


class SubprocessServer:
    """``python -m sglang.launch_server`` in a process group of its own (terminated as a group)."""

    def __init__(self, spec: ServerSpec, cfg: SGLangConfig, log_dir: Path, *, attempt: int = 0) -> None:
        self.url = spec.url
        cmd = [
            cfg.python or sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            spec.model_path,
            "--host",
            spec.host,
            "--port",
            str(spec.port),
            "--tp-size",
            str(spec.tp_size),
            "--base-gpu-id",
            str(spec.base_gpu_id),
            "--random-seed",
            str(spec.seed),
            "--skip-tokenizer-init",  # token ids in, token ids out
        ]
        if cfg.mem_fraction_static > 0:
            cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
        cmd += list(cfg.extra_args)
        log_dir.mkdir(parents=True, exist_ok=True)
        # A server of an earlier attempt whose rollout worker was killed outlives it (own session):
        # end it before taking its port -- that very process only (its record), never a reused pid.
        self.pid_path = log_dir / f"sglang-{spec.port}.proc.json"
        _reap_stale_server(self.pid_path)
        self.log_path = log_dir / f"sglang-w{spec.worker}-s{spec.index}-{spec.port}.log"
        self._log = self.log_path.open("ab")
        self.cmd = cmd
        env = dict(os.environ)
        if cfg.cuda_visible_devices:
            env["CUDA_VISIBLE_DEVICES"] = cfg.cuda_visible_devices
        elif env.get("CUDA_VISIBLE_DEVICES") == "":
            del env["CUDA_VISIBLE_DEVICES"]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        record = ProcessRecord("sglang", str(log_dir.resolve()), attempt)
        record.with_process(self.proc.pid).write(self.pid_path)

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            # Our child, not yet reaped: its pid is its own. A refused signal is logged, not raised.
            try:
                os.killpg(self.proc.pid, 15)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, 9)
        self._log.close()


def _reap_stale_server(record_path: Path) -> bool:
    """Kills the process group of a recorded launch_server while that very process (pid, start
    time, boot id) still runs; True when it did."""
    rec = ProcessRecord.read(record_path)
    if rec is None or rec.kind != "sglang" or not rec.is_running():
        return False
    try:
        os.killpg(rec.pid, 9)
    except (ProcessLookupError, PermissionError):
        return False
    time.sleep(1.0)  # let the port go
    return True


def default_launcher(cfg: SGLangConfig, log_dir: Path, *, attempt: int = 0) -> Launcher:
    return lambda spec: SubprocessServer(spec, cfg, log_dir, attempt=attempt)
