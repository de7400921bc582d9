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

    def __init__(self, spec: ServerSpec, cfg: SGLangConfig, log_dir: Path) -> None:
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
        # end it before taking its port.
        self.pid_path = log_dir / f"sglang-{spec.port}.pid"
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
        self.pid_path.write_text(str(self.proc.pid))

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
        self._log.close()


def _reap_stale_server(pid_path: Path) -> None:
    """Kills the process group of a recorded launch_server that is still running (checked by cmdline)."""
    try:
        pid = int(pid_path.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"sglang.launch_server" in cmdline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, 9)
        time.sleep(1.0)  # let the port go


def default_launcher(cfg: SGLangConfig, log_dir: Path) -> Launcher:
    return lambda spec: SubprocessServer(spec, cfg, log_dir)
