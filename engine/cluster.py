"""Ray on loopback: a local cluster by default, or an existing cluster's address.

``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every Ray component on 127.0.0.1; without
it Ray talks over the machine's own address even when told 127.0.0.1.
"""

from __future__ import annotations

import logging
import os

from .contract.config import RayConfig

_LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}


def loopback_env() -> dict[str, str]:
    return dict(_LOOPBACK_ENV)


# Ray starts its workers -- here the trainer ranks and rollout workers -- at niceness 15 (its
# ``worker_niceness``), below every ordinary process on the node: the driver, the daemon, a
# shell's job. A local cluster runs them at 0 like the driver; telemetry threads run at
# ``supervisor.telemetry_nice`` below them. Set RAY_worker_niceness to choose otherwise.
_LOCAL_CLUSTER_ENV = {"RAY_worker_niceness": "0"}


def ensure_ray(cfg: RayConfig, *, needed_cpus: int) -> bool:
    """Connects to (or starts) Ray; returns True when this call started it."""
    for k, v in _LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return False
    if cfg.address == "local":
        for k, v in _LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(k, v)
        ray.init(
            address="local",
            num_cpus=max(cfg.num_cpus, needed_cpus),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    else:
        ray.init(address=cfg.address, logging_level=logging.WARNING)
    return True
