"""Checkpoint directories: atomic commit, verification, fallback, retention."""

from __future__ import annotations

from pathlib import Path

from milepost.engine.checkpoint import LATEST, Checkpoint, CheckpointStore


def _save(store: CheckpointStore, step: int, payload: bytes = b"x" * 100) -> Checkpoint:
    tmp = store.begin(step)
    (tmp / "__0_0.distcp").write_bytes(payload + bytes([step]))
    (tmp / ".metadata").write_bytes(b"meta")
    return store.commit(step, {"world_size": 2, "state_checksum": f"sum{step}"})


def test_commit_writes_manifest_and_latest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=3)
    ckpt = _save(store, 5)
    assert ckpt.path.name == "step_00000005" and not store.tmp_dir(5).exists()
    assert (tmp_path / LATEST).read_text() == "step_00000005"
    m = ckpt.manifest
    assert m["step"] == 5 and m["world_size"] == 2 and set(m["files"]) == {"__0_0.distcp", ".metadata"}
    assert len(m["files"]["__0_0.distcp"]["sha256"]) == 64
    assert store.verify(store.committed()[0]) is None


def test_uncommitted_tmp_is_never_resumed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    _save(store, 2)
    tmp = store.begin(4)  # a save that crashed before commit
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    found = store.find_resumable()
    assert found is not None and found.step == 2


def test_truncated_file_falls_back_to_previous_with_reason(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=5)
    _save(store, 2)
    newest = _save(store, 4)
    shard = newest.path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:10])
    skipped: list[tuple[int, str]] = []
    found = store.find_resumable(on_skip=lambda c, why: skipped.append((c.step, why)))
    assert found is not None and found.step == 2
    assert skipped == [(4, "step_00000004: file __0_0.distcp has 10 bytes, manifest says 101")]


def test_bitflip_and_missing_manifest_are_skipped(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=5)
    _save(store, 1)
    two = _save(store, 2)
    three = _save(store, 3)
    data = bytearray((three.path / "__0_0.distcp").read_bytes())
    data[0] ^= 0xFF
    (three.path / "__0_0.distcp").write_bytes(bytes(data))
    (two.path / "manifest.json").unlink()
    reasons: list[str] = []
    found = store.find_resumable(on_skip=lambda c, why: reasons.append(why))
    assert found is not None and found.step == 1
    assert "sha256 does not match" in reasons[0] and "manifest.json missing" in reasons[1]


def test_retention_keeps_last_k(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        _save(store, step)
    assert [c.step for c in store.committed()] == [4, 3]


def test_nothing_to_resume(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path).find_resumable() is None
