"""Stacks read where each rank runs: the per-node helpers on a real two-node Ray cluster.

The engine side (a Ray driver with its ``StackService``, a two-node loopback cluster, a rank
actor on the second node, SIGSTOPped) runs in a process of its own, as an attempt does; the
daemon side (``daemon.evidence``, no Ray) runs here. The rank's host is reported as another
machine's, so that a stack can only have come through the helper on the rank's node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from milepost.daemon import evidence
from milepost.engine.contract.layout import RunDir

pytestmark = pytest.mark.slow

ENGINE_SIDE = r"""
import json, os, signal, sys, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from milepost.engine.stack_helper import StackService

run_dir, info = Path(sys.argv[1]), Path(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1, resources={"second": 1})
ray.init(address=cluster.address)
try:
    @ray.remote(num_cpus=0, resources={"second": 1})
    class Rank:
        def where(self):
            return os.getpid(), ray.get_runtime_context().get_node_id()
        def train_loop(self):
            while True:
                time.sleep(0.01)
    rank = Rank.remote()
    pid, node = ray.get(rank.where.remote(), timeout=120)
    rank.train_loop.remote()
    time.sleep(0.5)  # inside train_loop
    os.kill(pid, signal.SIGSTOP)  # frozen, as `milepost inject --kind hang` leaves a rank
    head = ray.get_runtime_context().get_node_id()
    service = StackService(run_dir, 0, lambda: {("trainer", 1): node}).start()
    info.write_text(json.dumps({"pid": pid, "node": node, "head": head, "nodes": sorted(service.helpers)}))
    deadline = time.monotonic() + 170
    while not (run_dir / "quit").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(pid, signal.SIGCONT)
    service.close()
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_stopped_rank_on_another_node_has_its_stack_through_its_node_helper(tmp_path: Path) -> None:
    run_dir, info = tmp_path / "run", tmp_path / "info.json"
    run_dir.mkdir()
    engine = subprocess.Popen(
        [sys.executable, "-c", ENGINE_SIDE, str(run_dir), str(info)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (info.exists() and RunDir(run_dir).stack_helpers(0).exists()):
            assert engine.poll() is None, engine.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the helpers did not come up"
            time.sleep(0.2)
        where = json.loads(info.read_text())
        assert where["node"] != where["head"] and sorted([where["node"], where["head"]]) == where["nodes"]
        rank = {"role": "trainer", "rank": 1, "attempt": 0, "data": {"pid": where["pid"], "host": "node-2"}}
        found = evidence.collect(run_dir, 1, 0, [rank], stacks=True)
        assert found["stacks_from"] == {"trainer1": f"node {where['node']}"}
        text = Path(found["stacks"]["trainer1"]).read_text()
        assert f"read on its node {where['node']}" in text, text
        assert "MainThread" in text and "train_loop" in text, text
    finally:
        (run_dir / "quit").touch()
        try:
            engine.wait(timeout=60)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
