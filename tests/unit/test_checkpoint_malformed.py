"""Manifests that parse but are malformed get a reason that names the checkpoint and the field, never an
exception; and the corrupt-checkpoint fault flips bytes in place instead of reading a shard into memory."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from milepost.engine.checkpoint import MANIFEST, Checkpoint, CheckpointStore
from milepost.engine.faults import flip_bytes

GOOD_SHA = "0" * 64


def _with_manifest(tmp_path: Path, manifest: Any) -> tuple[CheckpointStore, Path]:
    store = CheckpointStore(tmp_path)
    tmp = store.begin(3)
    (tmp / "shard.distcp").write_bytes(b"x" * 64)
    ckpt = store.commit(3, {"world_size": 2})
    (ckpt.path / MANIFEST).write_text(json.dumps(manifest))
    return store, ckpt.path


def _base(**over: Any) -> dict[str, Any]:
    return {"format_version": 1, "step": 3, **over}


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        ([1, 2], "not a JSON object"),
        ("text", "not a JSON object"),
        (_base(files=[]), "manifest files=[]: want a non-empty object"),
        (_base(files={}), "manifest files={}: want a non-empty object"),
        (_base(files="shard.distcp"), "manifest files='shard.distcp'"),
        (_base(files={"shard.distcp": 64}), "files['shard.distcp']: 64: want an object"),
        (_base(files={"shard.distcp": {"sha256": GOOD_SHA}}), "bytes=None: want a non-negative integer"),
        (_base(files={"shard.distcp": {"bytes": "64", "sha256": GOOD_SHA}}), "bytes='64'"),
        (_base(files={"shard.distcp": {"bytes": 64, "sha256": None}}), "sha256=None: want 64 lowercase hex"),
        (_base(files={"../../etc/passwd": {"bytes": 1, "sha256": GOOD_SHA}}), "a relative path inside"),
        (_base(files={"/etc/passwd": {"bytes": 1, "sha256": GOOD_SHA}}), "a relative path inside"),
    ],
)
def test_a_malformed_manifest_is_a_reason_naming_the_field(
    tmp_path: Path, manifest: Any, reason: str
) -> None:
    store, path = _with_manifest(tmp_path, manifest)
    skipped: list[tuple[int, str]] = []
    assert store.find_resumable(on_skip=lambda c, why: skipped.append((c.step, why))) is None
    assert len(skipped) == 1 and skipped[0][1].startswith(path.name + ": ")
    assert reason in skipped[0][1]


def test_a_manifest_that_is_not_utf8_is_a_reason_not_an_exception(tmp_path: Path) -> None:
    store, path = _with_manifest(tmp_path, {})
    (path / MANIFEST).write_bytes(b"\xff\xfe{")
    (ckpt,) = store.committed()
    assert (
        CheckpointStore.verify(ckpt) == f"{path.name}: manifest.json missing, unreadable or not a JSON object"
    )


def test_verify_takes_a_checkpoint_whatever_its_manifest_holds(tmp_path: Path) -> None:
    odd = Checkpoint(step=1, path=tmp_path, manifest={"format_version": 1, "step": 1, "files": None})
    assert "want a non-empty object" in (CheckpointStore.verify(odd) or "")


def test_flip_bytes_changes_the_middle_in_place_without_reading_the_file(tmp_path: Path) -> None:
    shard = tmp_path / "shard.distcp"
    size = 32 * 1024 * 1024
    with shard.open("wb") as f:
        f.truncate(size)  # sparse: 32 MiB of zeros
    tracemalloc.start()
    try:
        offset, count = flip_bytes(shard)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024  # far below the shard's size: only the flipped block was read
    assert shard.stat().st_size == size and count == 4096 and offset == (size - count) // 2
    with shard.open("rb") as f:
        f.seek(offset - 1)
        around = f.read(count + 2)
    assert around == b"\x00" + b"\xff" * count + b"\x00"
