"""Shared fixtures. Ray and every server in these tests stay on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from milepost.engine.cluster import loopback_env

for _k, _v in loopback_env().items():
    os.environ[_k] = _v

REPO = Path(__file__).resolve().parent.parent


def tiny_job(**overrides: dict[str, Any]) -> dict[str, Any]:
    """A job small enough for tests: a few steps of a small batch, checkpoints every 2 steps."""
    doc: dict[str, dict[str, Any]] = {
        "run": {"name": "test", "seed": 7, "steps": 6},
        "grpo": {"prompts_per_step": 4, "group_size": 4, "minibatches": 2},
        "trainer": {"world_size": 2, "max_world_size": 3, "collective_timeout_s": 60.0},
        "rollout": {"workers": 1},
        "checkpoint": {"interval": 2, "keep_last": 10},
        "supervisor": {"allow_faults": True},  # tests inject faults
    }
    for section, values in overrides.items():
        if isinstance(values, list):
            doc[section] = values  # type: ignore[assignment]
        else:
            doc.setdefault(section, {}).update(values)
    return doc


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One loopback Ray cluster for the whole session (starting one costs seconds)."""
    import ray
    from milepost.engine.cluster import RayConfig, ensure_ray

    started = ensure_ray(RayConfig(address="local", num_cpus=4), needed_cpus=4)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _keep_main_module() -> Iterator[None]:
    """Streamlit's AppTest runs each script as ``__main__`` and leaves it in ``sys.modules``;
    a later test that spawns processes (torch.multiprocessing, multiprocessing) would then
    re-run that script in the child and die. Put the real ``__main__`` back after every test."""
    import sys

    main = sys.modules.get("__main__")
    yield
    if main is not None and sys.modules.get("__main__") is not main:
        sys.modules["__main__"] = main
