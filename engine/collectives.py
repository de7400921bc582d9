"""Rank-side collective tracking: every torch.distributed collective goes through the instrument.

``install(inst)`` wraps the collective functions of ``torch.distributed`` (both the package
attributes, which FSDP2 and Megatron call as ``dist.all_reduce`` etc., and the
``distributed_c10d`` module globals, which torch's own helpers call). Each call records
group, per-group sequence number, op, bytes, dtype and enter time; sync calls close at
return, async ones when their work's future completes. Nested calls (one collective
implemented through another) are recorded once. Point-to-point ops are left alone: they
have no per-group sequence shared by all ranks.

Also here: the flight recorder switch, and the ``skip-collective`` fault.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from .instrument import RankInstrument

# op name -> (argument holding the tensor whose size is the message size, multiply by world size?)
_OPS: dict[str, tuple[str, bool]] = {
    "all_reduce": ("tensor", False),
    "broadcast": ("tensor", False),
    "reduce": ("tensor", False),
    "all_gather": ("tensor", True),
    "all_gather_into_tensor": ("output_tensor", False),
    "all_gather_single": ("output_tensor", False),
    "_all_gather_base": ("output_tensor", False),
    "reduce_scatter": ("output", True),
    "reduce_scatter_tensor": ("input", False),
    "reduce_scatter_single": ("input", False),
    "_reduce_scatter_base": ("input", False),
    "all_to_all_single": ("input", False),
    "gather": ("tensor", False),
    "scatter": ("tensor", False),
    "barrier": ("", False),
}
_CANONICAL = {
    "all_gather_into_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "_all_gather_base": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "all_to_all_single": "all_to_all",
}

_state = threading.local()
_group_names: dict[int, str] = {}
_installed: dict[str, Callable[..., Any]] = {}
_tracker: Tracker | None = None


class Tracker:
    def __init__(self, inst: RankInstrument) -> None:
        self.inst = inst
        self.skip_next: str | None = None  # fault: skip the next sync collective of this op
        self.skipped = 0


def enable_flight_recorder(buffer_size: int = 2000) -> None:
    """Must run before the process group is created: torch reads these at creation."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(buffer_size))


def name_group(pg: Any, name: str) -> None:
    _group_names[id(pg)] = name


def group_name(pg: Any) -> str:
    if pg is None or pg is c10d.GroupMember.WORLD:
        return "world"
    if id(pg) in _group_names:
        return _group_names[id(pg)]
    desc = getattr(pg, "group_desc", "") or ""
    return desc if desc and desc != "undefined" else str(getattr(pg, "group_name", "group"))


def _nbytes(t: Any) -> tuple[int, str]:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size(), str(t.dtype).removeprefix("torch.")
    if isinstance(t, list | tuple) and t and isinstance(t[0], torch.Tensor):
        return sum(x.numel() * x.element_size() for x in t), str(t[0].dtype).removeprefix("torch.")
    return 0, ""


def _wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(fn)
    arg, times_world = _OPS[name]
    op = _CANONICAL.get(name, name)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tracker = _tracker
        if tracker is None or getattr(_state, "inside", False) or tracker.inst.explicit_depth():
            return fn(*args, **kwargs)
        bound = sig.bind_partial(*args, **kwargs)
        pg = bound.arguments.get("group")
        async_op = bool(bound.arguments.get("async_op", False))
        if tracker.skip_next == op and not async_op:
            tracker.skip_next = None
            tracker.skipped += 1
            return None  # the injected desync: this rank never joins the collective
        world = c10d.get_world_size(pg) if c10d.is_initialized() else 1
        nbytes, dtype = _nbytes(bound.arguments.get(arg)) if arg else (0, "")
        if times_world:
            nbytes *= world
        rec = tracker.inst.begin_collective(op, group=group_name(pg), nbytes=nbytes, dtype=dtype, world=world)
        _state.inside = True
        try:
            work = fn(*args, **kwargs)
        except BaseException:
            tracker.inst.end_collective(rec)
            raise
        finally:
            _state.inside = False
        if async_op and work is not None:
            # No future on some work types: then a later collective on the group closes it.
            with contextlib.suppress(Exception):
                work.get_future().add_done_callback(lambda _f: tracker.inst.end_collective(rec))
        else:
            tracker.inst.end_collective(rec)
        return work

    wrapper.__milepost_wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def install(inst: RankInstrument) -> Tracker:
    """Routes torch.distributed collectives of this process through ``inst`` (idempotent)."""
    global _tracker
    _tracker = Tracker(inst)
    for name in _OPS:
        original = _installed.get(name) or getattr(c10d, name, None)
        if original is None:
            continue
        _installed[name] = original
        wrapped = _wrap(name, original)
        setattr(c10d, name, wrapped)
        if hasattr(dist, name):
            setattr(dist, name, wrapped)
    return _tracker


def tracker() -> Tracker | None:
    return _tracker


def dump_flight_recorder() -> dict[str, Any]:
    """torch's flight recorder of this process as plain fields (the pickle is made and read here)."""
    import pickle

    raw = torch._C._distributed_c10d._dump_fr_trace(  # type: ignore[attr-defined]
        includeCollectives=True, includeStackTraces=False, onlyActive=False
    )
    data = pickle.loads(raw)  # produced by torch in this very process, never from the wire
    entries = [
        {
            "pg": str(e.get("process_group", ("", ""))[0])
            if isinstance(e.get("process_group"), tuple)
            else "",
            "seq": e.get("collective_seq_id"),
            "op": e.get("profiling_name"),
            "state": e.get("state"),
            "time_created_ns": e.get("time_created_ns"),
            "input_sizes": e.get("input_sizes"),
        }
        for e in data.get("entries", [])
    ]
    status = {
        str(k): {kk: v for kk, v in dict(vv).items()} for k, vv in dict(data.get("pg_status", {})).items()
    }
    return {"version": data.get("version"), "pg_status": status, "entries": entries[-200:]}
