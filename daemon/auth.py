"""Per-run bearer token for the daemon's HTTP API.

The token is ``$MILEPOST_TOKEN`` when set, else the file ``<run_dir>/token`` (mode 0600),
made on first use. Tools that only read (the client, ``milepost status``) use
:func:`read_token`, which never creates the file.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from milepost.engine.contract.layout import TOKEN_FILE, RunDir
from milepost.engine.contract.process import TOKEN_ENV

__all__ = ["TOKEN_ENV", "load_or_create_token", "read_token", "token_path", "tokens_equal"]


def token_path(run_dir: str | os.PathLike[str]) -> Path:
    return RunDir(run_dir).token


def read_token(run_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The token from ``$MILEPOST_TOKEN`` or ``<run_dir>/token``; None when neither exists."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    if run_dir is None:
        return None
    try:
        token = token_path(run_dir).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not token:
        raise ValueError(f"{token_path(run_dir)} is empty: delete it to make a new token")
    return token


def load_or_create_token(run_dir: str | os.PathLike[str]) -> str:
    """The run's token, creating ``<run_dir>/token`` (0600) if there is none yet."""
    token = read_token(run_dir)
    if token is not None:
        return token
    path = token_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # Write a private temp file, then hard-link it into place: the link is atomic and fails if
    # another process won the race, so no reader ever sees a half-written or looser-mode token.
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            existing = read_token(run_dir)
            assert existing is not None
            return existing
    finally:
        tmp.unlink(missing_ok=True)
    return token


def tokens_equal(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so response timing leaks nothing about the token."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
