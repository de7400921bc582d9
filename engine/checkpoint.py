"""Atomic, verified checkpoint directories (the file side; torch-free).

Layout under the checkpoint root::

    step_00000010.tmp/   a save in progress (DCP shards + .metadata); never loaded
    step_00000010/       committed: DCP files + manifest.json
    latest               name of the newest committed step directory

Commit: fsync every file, write ``manifest.json`` (step, world size, backend, sha256 of
each file, weight version, data position, RNG scheme, state checksum), fsync, rename
``.tmp`` -> final, fsync the root, then replace ``latest``. A crash at any point leaves
either the previous checkpoint or the new one, never a half one that verifies.
Resume walks committed checkpoints newest first and takes the first whose manifest
verifies; each one skipped becomes an event naming the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT_VERSION = 1
_PREFIX = "step_"


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    manifest: dict[str, Any]


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad_entry(rel: str, want: Any) -> str | None:
    """What is wrong with one ``files`` entry of a manifest, or None."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or rel == MANIFEST:
        return "the name must be a relative path inside the checkpoint"
    if not isinstance(want, dict):
        return f"{_short(want)}: want an object with bytes and sha256"
    size, digest = want.get("bytes"), want.get("sha256")
    if type(size) is not int or size < 0:
        return f"bytes={_short(size)}: want a non-negative integer"
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return f"sha256={_short(digest)}: want 64 lowercase hex digits"
    return None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def step_dirname(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


class CheckpointStore:
    """Commits, verifies, finds and prunes checkpoint directories under ``root``."""

    def __init__(self, root: str | os.PathLike[str], *, keep_last: int = 3) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.root.mkdir(parents=True, exist_ok=True)

    def tmp_dir(self, step: int) -> Path:
        return self.root / (step_dirname(step) + ".tmp")

    def final_dir(self, step: int) -> Path:
        return self.root / step_dirname(step)

    def begin(self, step: int) -> Path:
        """Returns an empty ``.tmp`` directory for the save of ``step``."""
        tmp = self.tmp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, meta: dict[str, Any]) -> Checkpoint:
        """Hashes and fsyncs the files of the ``.tmp`` save, writes the manifest, renames, moves ``latest``."""
        tmp = self.tmp_dir(step)
        if not tmp.is_dir():
            raise CheckpointError(f"commit of step {step}: {tmp} does not exist")
        files: dict[str, dict[str, Any]] = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_path(f)
            files[str(f.relative_to(tmp))] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
        if not files:
            raise CheckpointError(f"commit of step {step}: {tmp} holds no files")
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "committed_at": time.time(),
            **meta,
            "files": files,
        }
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        final = self.final_dir(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(self.root)
        _write_atomic(self.root / LATEST, final.name.encode())
        self.prune()
        return Checkpoint(step=step, path=final, manifest=manifest)

    def committed(self) -> list[Checkpoint]:
        """Committed checkpoints (a manifest is present), newest first; not yet verified."""
        out: list[Checkpoint] = []
        for d in self.root.glob(_PREFIX + "*"):
            if d.suffix == ".tmp" or not d.is_dir():
                continue
            try:
                step = int(d.name[len(_PREFIX) :])
            except ValueError:
                continue
            manifest: dict[str, Any] = {}
            try:
                manifest = json.loads((d / MANIFEST).read_text())
            except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8; verify names it
                manifest = {}
            out.append(Checkpoint(step=step, path=d, manifest=manifest))
        return sorted(out, key=lambda c: c.step, reverse=True)

    @staticmethod
    def verify(ckpt: Checkpoint) -> str | None:
        """Returns None when every file matches the manifest, else the reason it does not (never raises)."""
        m = ckpt.manifest
        if not m or not isinstance(m, dict):
            return f"{ckpt.path.name}: manifest.json missing, unreadable or not a JSON object"
        if m.get("format_version") != FORMAT_VERSION:
            return f"{ckpt.path.name}: manifest format_version={m.get('format_version')!r}, expected {FORMAT_VERSION}"
        if m.get("step") != ckpt.step:
            return f"{ckpt.path.name}: manifest step={m.get('step')!r} does not match the directory"
        files = m.get("files")
        if not isinstance(files, dict) or not files:
            return (
                f"{ckpt.path.name}: manifest files={_short(files)}: want a non-empty object of file entries"
            )
        for rel, want in files.items():
            if (bad := _bad_entry(rel, want)) is not None:
                return f"{ckpt.path.name}: manifest files[{rel!r}]: {bad}"
            f = ckpt.path / rel
            try:
                f.stat()
            except OSError as e:
                return f"{ckpt.path.name}: file {rel} cannot be read: {e.strerror or e}"
            if not f.is_file():
                return f"{ckpt.path.name}: file {rel} is missing"
            size = f.stat().st_size
            if size != want["bytes"]:
                return f"{ckpt.path.name}: file {rel} has {size} bytes, manifest says {want['bytes']}"
            try:
                digest = _sha256(f)
            except OSError as e:
                return f"{ckpt.path.name}: file {rel} cannot be read: {e.strerror or e}"
            if digest != want["sha256"]:
                return f"{ckpt.path.name}: file {rel} sha256 does not match the manifest"
        return None

    def iter_valid(self, on_skip: Callable[[Checkpoint, str], None] | None = None) -> Iterator[Checkpoint]:
        for ckpt in self.committed():
            reason = self.verify(ckpt)
            if reason is None:
                yield ckpt
            elif on_skip is not None:
                on_skip(ckpt, reason)

    def find_resumable(self, on_skip: Callable[[Checkpoint, str], None] | None = None) -> Checkpoint | None:
        """The newest checkpoint whose manifest verifies; ``on_skip`` hears about each one passed over."""
        return next(self.iter_valid(on_skip), None)

    def prune(self) -> list[Path]:
        """Deletes committed checkpoints beyond ``keep_last`` and abandoned ``.tmp`` saves older than the newest."""
        removed: list[Path] = []
        committed = self.committed()
        for ckpt in committed[self.keep_last :]:
            shutil.rmtree(ckpt.path, ignore_errors=True)
            removed.append(ckpt.path)
        newest = committed[0].step if committed else -1
        for tmp in self.root.glob(_PREFIX + "*.tmp"):
            try:
                step = int(tmp.name[len(_PREFIX) : -len(".tmp")])
            except ValueError:
                continue
            if step <= newest:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        return removed
