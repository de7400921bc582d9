"""Stacks of a rank for the evidence of a hang: a real process, running or SIGSTOPped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from milepost.daemon import evidence
from milepost.engine.contract.stacks import is_stopped

SCRIPT = """
import sys, threading, time
def reporter():
    while True: time.sleep(0.05)
def train_loop():
    print("ready", flush=True)
    while True: time.sleep(0.01)
threading.Thread(target=reporter, name="reporter", daemon=True).start()
train_loop()
"""


@pytest.fixture
def rank() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 5
    while not is_stopped(pid):
        assert time.monotonic() < deadline, f"pid {pid} never showed as stopped"
        time.sleep(0.01)


def test_a_sigstopped_rank_has_its_main_thread_frames(rank: subprocess.Popen[str], tmp_path: Path) -> None:
    os.kill(rank.pid, signal.SIGSTOP)  # what `milepost inject --kind hang` does
    _wait_stopped(rank.pid)
    dest = tmp_path / "stack_trainer1.txt"
    evidence.py_spy(rank.pid, dest)
    text = dest.read_text()
    assert "MainThread" in text and "train_loop" in text, text
    assert '"reporter"' in text
    assert is_stopped(rank.pid)  # left as it was found


def test_a_running_rank_has_its_frames(rank: subprocess.Popen[str], tmp_path: Path) -> None:
    assert not is_stopped(rank.pid)
    dest = tmp_path / "stack_trainer0.txt"
    evidence.py_spy(rank.pid, dest)
    assert "train_loop" in dest.read_text()


def test_a_rank_on_another_host_without_a_helper_is_not_dumped_here(
    rank: subprocess.Popen[str], tmp_path: Path
) -> None:
    """Its pid names some process of this host, not the rank: no dump of a stranger."""
    rows = [
        {"role": "trainer", "rank": 0, "attempt": 2, "data": {"pid": rank.pid, "host": "elsewhere"}},
        {"role": "trainer", "rank": 1, "attempt": 2, "data": {"pid": rank.pid}},  # here
    ]
    found = evidence.collect(tmp_path, 7, 2, rows, stacks=True)
    assert found["stacks_from"] == {"trainer0": "none", "trainer1": "daemon host"}
    assert "runs on elsewhere" in Path(found["stacks"]["trainer0"]).read_text()
    assert "train_loop" in Path(found["stacks"]["trainer1"]).read_text()
