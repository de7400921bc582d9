"""Elastic recovery on a real two-node Ray cluster (both nodes on loopback in this machine).

A world-size-2 job runs on 3 CPUs (2 trainer slots + 1 rollout). A node leaves, a trainer
rank dies, and the daemon's next attempt resumes at world size 1 from the checkpoint
saved at 2; when the node comes back, a later restart grows the job back to 2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DaemonRun

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "include_dashboard": False}
    )
    try:
        yield c
    finally:
        c.shutdown()


def _cpus(cluster: Any) -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def _trainer_pid(run: DaemonRun, rank: int, attempt: int) -> int:
    client = run.client()
    ranks = run.wait(
        f"trainer {rank} of attempt {attempt}",
        lambda: [
            r
            for r in client.ranks()
            if r["role"] == "trainer" and r["rank"] == rank and r["attempt"] == attempt
        ],
        60,
    )
    return int(ranks[0]["pid"])


def _kill(pid: int) -> None:
    """SIGKILL a rank; one that is already gone (its node left with it) is what was wanted."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_shrinks_to_free_slots_then_grows_back(tmp_path: Path, cluster: Any) -> None:
    import ray

    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    doc = {
        "run": {"name": "elastic", "seed": 5, "steps": 400},
        "grpo": {"prompts_per_step": 8, "group_size": 4, "minibatches": 2},
        "trainer": {"world_size": 2, "min_world_size": 1, "collective_timeout_s": 60.0},
        "checkpoint": {"interval": 2, "keep_last": 3},
        "supervisor": {"backoff_initial_s": 0.5, "backoff_max_s": 1.0},
    }
    run = DaemonRun(tmp_path, doc, ray_address=cluster.address)
    try:
        client = run.start()
        run.wait_step(3)
        assert client.attempts()[0]["world_size"] == 2

        if ray.is_initialized():  # the session's in-process cluster (tests/conftest.py ray_cluster)
            ray.shutdown()
        ray.init(address=cluster.address, logging_level="error")
        try:
            cluster.remove_node(node)
            run.wait("the cluster to lose a CPU", lambda: _cpus(cluster) == 2.0, 30)
            # If the removed node hosted a rank, the attempt is already failing; otherwise end one.
            if len(client.attempts()) == 1:
                _kill(_trainer_pid(run, 1, 0))
            shrunk = run.wait(
                "an attempt at world size 1",
                lambda: [
                    a
                    for a in client.attempts()
                    if a["number"] >= 1 and a["world_size"] == 1 and a["verified"]
                ],
            )[0]
            changed = [e for e in run.events("world_size_changed") if e["attempt"] == shrunk["number"]]
            assert changed and "running at world size 1" in changed[0]["message"]
            verified = [e for e in run.events("resume_verified") if e["attempt"] == shrunk["number"]][0]
            assert verified["data"]["saved_world_size"] == 2 and verified["data"]["world_size"] == 1
            step_at_shrink = run.status()["step"]
            run.wait_step(step_at_shrink + 2, timeout=60)

            # Slots come back: the next restart grows the job back to 2.
            cluster.add_node(num_cpus=1)
            run.wait("the cluster to regain a CPU", lambda: _cpus(cluster) == 3.0, 30)
            time.sleep(1.0)
            _kill(_trainer_pid(run, 0, shrunk["number"]))
            grown = run.wait(
                "an attempt back at world size 2",
                lambda: [
                    a
                    for a in client.attempts()
                    if a["number"] > shrunk["number"] and a["world_size"] == 2 and a["verified"]
                ],
            )[0]
            run.wait(
                "a step of the grown attempt",
                lambda: any(s["attempt"] == grown["number"] for s in client.steps(since=0)),
            )
        finally:
            ray.shutdown()
        client.control("stop")
        assert run.wait_state("STOPPED", "FAILED")["state"] == "STOPPED"
    finally:
        run.cleanup()
