"""The ``[sglang]`` section of a job file (read when ``rollout.backend = "sglang"``)."""

from __future__ import annotations

from dataclasses import dataclass, field

WEIGHT_UPDATES = ("disk", "tensor", "distributed")


@dataclass(kw_only=True)
class SGLangConfig:
    # Attach: the servers' base URLs (rollout worker i drives urls[i::rollout.workers]); a server
    # attached this way that dies is waited for, not restarted (milepost does not own its process).
    urls: list[str] = field(default_factory=list)
    # Launch (when urls is empty): `python -m sglang.launch_server` per server.
    model_path: str = ""  # an HF model directory; empty: the rollout writes one from the trainer's weights
    servers_per_worker: int = 1
    tp_size: int = 1
    host: str = "127.0.0.1"
    port_base: int = 30000  # server j of worker i listens on port_base + i * servers_per_worker + j
    base_gpu_id: int = 0  # first GPU of the first server; each server takes tp_size GPUs
    mem_fraction_static: float = 0.0  # 0: SGLang's default
    python: str = ""  # interpreter for launch_server; empty: the rollout worker's own
    # CUDA_VISIBLE_DEVICES for launched servers; empty: inherited (an empty inherited value, as Ray
    # gives actors without GPUs, is dropped so that --base-gpu-id picks the GPU)
    cuda_visible_devices: str = ""
    extra_args: list[str] = field(default_factory=list)
    # Weight updates: "disk" (POST /update_weights_from_disk with a directory the trainer's weights are
    # written to), "tensor" (/update_weights_from_tensor, same host), "distributed" (NCCL broadcast).
    weight_update: str = "disk"
    weight_dir: str = ""  # default: <run_dir>/sglang_weights
    # Health: a launched server is given startup_grace_s to come up; after that a check fails when
    # /health_generate does not answer 200 within check_timeout_s, and failure_threshold consecutive
    # failures (health_interval_s apart) declare it dead.
    startup_grace_s: float = 600.0
    health_interval_s: float = 5.0
    check_timeout_s: float = 20.0
    failure_threshold: int = 3
    request_timeout_s: float = 300.0
    max_restarts: int = 5  # per server

    def __post_init__(self) -> None:
        for name in ("servers_per_worker", "tp_size", "failure_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be >= 1")
        for name in ("startup_grace_s", "health_interval_s", "check_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts={self.max_restarts}: must be >= 0")
        if not 0 <= self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static={self.mem_fraction_static}: must be in [0, 1)")
        if not 1 <= self.port_base <= 65535:
            raise ValueError(f"port_base={self.port_base}: must be in [1, 65535]")
        if self.base_gpu_id < 0:
            raise ValueError(f"base_gpu_id={self.base_gpu_id}: must be >= 0")
        if self.weight_update not in WEIGHT_UPDATES:
            raise ValueError(f"weight_update={self.weight_update!r}: must be one of {list(WEIGHT_UPDATES)}")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"urls={self.urls!r}: {url!r} is not an http(s) URL")
