"""Per-node stack helpers: a rank's stacks are read on the node where the rank runs.

py-spy reads a process's memory, so it must run on the rank's own node; the daemon, on
its own host and without Ray, cannot. Each attempt's driver starts one ``StackHelper``
actor per alive Ray node, pinned there by ``NodeAffinitySchedulingStrategy`` (no CPU
reserved: it takes no trainer slot), and a thread, ``StackService``, that answers the
daemon's requests:

1. on a diagnosed hang the daemon writes ``diagnostics/diagnosis_N/stacks_request.json``
   (the ranks of the attempt: role, rank, pid);
2. the service asks the helper on each rank's node (known from the ranks' set-up, by Ray
   node id) to dump its pids (``engine.contract.stacks``: non-blocking for a SIGSTOPped
   rank), writes ``stack_{role}{rank}.txt`` and then ``stacks_done.json``.

Why a helper per node and not each rank's own reporter thread: a SIGSTOPped rank -- the
culprit an operator needs most -- runs no thread at all, while py-spy --nonblocking reads
it from outside. Why the request goes through the run dir: the driver already shares it
with the daemon (events.jsonl, steps.jsonl), and the driver's main thread may be the one
blocked on the hung collective while this thread still runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .contract.layout import STACKS_DONE, STACKS_REQUEST, RunDir, stack_file_name
from .contract.stacks import PY_SPY_TIMEOUT_S, dump_stacks

log = logging.getLogger(__name__)

HELPER_TIMEOUT_S = PY_SPY_TIMEOUT_S * 3 + 2  # three py-spy tries at most per pid, all pids at once


def current_node_id() -> str:
    """The Ray node id of this process ("" outside Ray): ranks report it at set-up, for stack requests."""
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return ""


class StackHelper:
    """Pinned to one node: dumps the stacks of processes of that node."""

    def node_id(self) -> str:
        return current_node_id()

    def dump(self, pids: list[int]) -> dict[int, str]:
        with ThreadPoolExecutor(max_workers=max(1, len(pids))) as pool:  # same moment for every rank
            return dict(zip(pids, pool.map(dump_stacks, pids), strict=True))


class StackService:
    """In an attempt's driver: a helper on every alive node, and a thread answering stack requests."""

    def __init__(
        self,
        run_dir: Path,
        attempt: int,
        rank_nodes: Callable[[], dict[tuple[str, int], str]],
        *,
        poll_s: float = 0.2,
    ) -> None:
        """``rank_nodes``: (role, rank) -> Ray node id of each rank of the attempt."""
        self.run_dir, self.attempt, self.rank_nodes, self.poll_s = (
            RunDir(run_dir),
            attempt,
            rank_nodes,
            poll_s,
        )
        self.helpers: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StackService:
        """Starts a helper on every alive node; a thread of its own waits for them, says so in
        the run dir, then serves (the attempt's start does not wait for the helpers)."""
        helper: Any = ray.remote(num_cpus=0, max_restarts=0)(StackHelper)
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            nid = node["NodeID"]
            self.helpers[nid] = helper.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=nid, soft=False)
            ).remote()
        self._thread = threading.Thread(target=self._serve, name="milepost-stack-service", daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float) -> bool:
        """True once the helpers answer (the run dir's marker is written)."""
        deadline = time.monotonic() + timeout
        while not self.run_dir.stack_helpers(self.attempt).exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        self._stop.set()
        self.run_dir.stack_helpers(self.attempt).unlink(missing_ok=True)
        for h in self.helpers.values():
            with contextlib.suppress(Exception):  # Ray may be going down already
                ray.kill(h, no_restart=True)
        self.helpers = {}

    def _serve(self) -> None:
        try:
            ray.get([h.node_id.remote() for h in self.helpers.values()], timeout=120)
        except Exception as e:
            log.warning("per-node stack helpers did not start: %r", e)
            return
        marker = self.run_dir.stack_helpers(self.attempt)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"attempt": self.attempt, "nodes": sorted(self.helpers)}))
        while not self._stop.wait(self.poll_s):
            for request in sorted(self.run_dir.diagnostics.glob(f"*/{STACKS_REQUEST}")):
                if not (request.parent / STACKS_DONE).exists():
                    try:
                        self.answer(request.parent)
                    except Exception:
                        # One bad request must not end the service for the attempt's next hang.
                        log.exception("stack request %s failed", request)

    def answer(self, where: Path) -> dict[str, Any]:
        """Dumps every requested rank on its own node; writes the stack files, then the done file."""
        req = json.loads((where / STACKS_REQUEST).read_text())
        nodes = self.rank_nodes()
        by_node: dict[str, list[dict[str, Any]]] = {}
        for r in req.get("ranks", []):
            node = nodes.get((r["role"], int(r["rank"])))
            if node in self.helpers:
                by_node.setdefault(node, []).append(r)
        calls = {n: self.helpers[n].dump.remote([int(r["pid"]) for r in rs]) for n, rs in by_node.items()}
        collected: dict[str, str] = {}
        for node, ref in calls.items():
            try:
                stacks = ray.get(ref, timeout=HELPER_TIMEOUT_S)
            except Exception as e:
                log.warning("the stack helper on node %s did not answer: %r", node, e)
                continue
            for r in by_node[node]:
                dest = where / stack_file_name(r["role"], int(r["rank"]))
                header = f"# stacks of pid {r['pid']}, read on its node {node} by its per-node helper\n"
                dest.write_text(header + stacks[int(r["pid"])])
                collected[f"{r['role']}{r['rank']}"] = node
        done = {"attempt": self.attempt, "collected": collected}
        tmp = where / (STACKS_DONE + ".tmp")
        tmp.write_text(json.dumps(done))
        tmp.replace(where / STACKS_DONE)
        return done
