"""Canonical checksums of model and optimizer state.

The same full (unsharded) state hashes to the same digest whatever the world size
or process that holds it, so a resumed attempt can prove it loaded exactly what was
saved, and a rollout worker can prove it received exactly what the trainer sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch


def _update(h: Any, key: str, value: Any) -> None:
    h.update(key.encode())
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if hasattr(t, "full_tensor"):
            raise TypeError(f"{key}: checksum needs a full tensor, got a DTensor shard")
        t = t.to("cpu").contiguous()
        h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, Mapping):
        for k in sorted(value, key=str):
            _update(h, f"{key}.{k}", value[k])
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _update(h, f"{key}[{i}]", v)
    else:
        h.update(f"={value!r}".encode())


def state_checksum(state: Mapping[str, Any]) -> str:
    """sha256 over keys, dtypes, shapes and bytes of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(state, key=str):
        _update(h, str(k), state[k])
    return h.hexdigest()
