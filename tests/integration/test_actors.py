"""Naming the failed actor: real Ray actors, one dying while its peer's call fails first."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import ray
from milepost.engine.actors import ActorFailure, gather

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


@ray.remote(num_cpus=0)
class Rank:
    def fail_after(self, s: float) -> None:
        time.sleep(s)
        raise RuntimeError("Connection closed by peer")  # what a survivor's collective raises

    def die_after(self, s: float) -> None:
        time.sleep(s)
        os._exit(1)  # noqa: SLF001 -- the process dies, as under SIGKILL

    def work(self, s: float) -> str:
        time.sleep(s)
        return "ok"


def _owners(actors: list[Any]) -> dict[str, tuple[str, int]]:
    return {a._actor_id.hex(): ("trainer", i) for i, a in enumerate(actors)}


def test_a_dead_peer_is_named_not_the_survivor_whose_collective_failed() -> None:
    survivor, dead = Rank.remote(), Rank.remote()  # type: ignore[attr-defined]
    refs = [survivor.fail_after.remote(0.2), dead.die_after.remote(0.6)]
    with pytest.raises(ActorFailure) as err:
        gather(refs, [survivor, dead], _owners([survivor, dead]))
    assert (err.value.role, err.value.rank, err.value.died) == ("trainer", 1, True), str(err.value)


def test_an_error_with_no_death_is_named_after_the_grace() -> None:
    failing, busy = Rank.remote(), Rank.remote()  # type: ignore[attr-defined]
    t0 = time.monotonic()
    with pytest.raises(ActorFailure) as err:
        gather(
            [failing.fail_after.remote(0.1), busy.work.remote(30.0)],
            [failing, busy],
            _owners([failing, busy]),
        )
    assert (err.value.rank, err.value.died) == (0, False) and "raised RuntimeError" in str(err.value)
    assert time.monotonic() - t0 < 10  # the grace, not the busy peer's 30 s
    ray.kill(busy)
