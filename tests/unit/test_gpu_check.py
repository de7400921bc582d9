"""bench/gpu_collector.py, the check of the real NVML path that runs on a GPU machine.

Here there is no GPU: the check runs for real on the no-GPU path, and on recorded NVML values
(the FakeNVML of test_gpu.py) against a fake ``nvidia-smi`` (a shell script printing what the
real one prints for those values), once agreeing and once not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from milepost.engine import gpu as gpu_mod
from milepost.engine.gpu import REASONS

from tests.unit.test_gpu import RECORDED, FakeNVML

pytestmark = pytest.mark.timeout(90)

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_collector.py"
MIB = 1024 * 1024


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_collector_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_smi(tmp_path: Path, memory_total_mib: list[float]) -> None:
    """A fake nvidia-smi answering --query-gpu with the recorded devices' values."""
    rows = []
    for i, (d, total) in enumerate(zip(RECORDED["devices"], memory_total_mib, strict=True)):
        used = d["memory"]["used"] / MIB
        rows.append(
            f"{i}, {d['uuid']}, {total:.0f}, {used:.0f}, {d['power_mw'] / 1000:.2f}, "
            f"{d['temperature_c']}, {d['utilization']['gpu']}"
        )
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(rows) + "\nEOF\n")
    script.chmod(0o755)


def _recorded_totals() -> list[float]:
    """Each recorded device's memory total in MiB, as nvidia-smi would print it."""
    return [d["memory"]["total"] / MIB for d in RECORDED["devices"]]


@pytest.fixture
def run_recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any) -> Any:
    """Runs the check on the recorded GPUs, nvidia-smi saying ``totals``; gives (rc, result)."""

    def run(totals: list[float]) -> tuple[int, Any]:
        _fake_smi(tmp_path, totals)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setattr(gpu_mod, "_import_nvml", lambda: FakeNVML(RECORDED))
        bench = _bench()
        monkeypatch.setattr(bench, "_cuda_devices", lambda: 2)  # torch would see the two GPUs
        rc = bench.main(["--seconds", "0.3", "--interval", "0.1"])
        return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    return run


def test_no_gpu_here_the_check_passes_with_the_collector_down() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "1", "--interval", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "gpu_collector" and result["ok"] and result["problems"] == []
    assert result["up"] == 0 and result["reason"] in REASONS and result["reason"] != "ok"
    assert result["devices"] == 0 and result["samples"] >= 2 and result["nvidia_smi"] == "absent"
    if shutil.which("promtool"):
        assert result["promtool"] == "ok"


def test_recorded_gpus_agree_with_nvidia_smi(run_recorded: Any) -> None:
    rc, result = run_recorded(_recorded_totals())
    assert rc == 0, result["problems"]
    assert (result["up"], result["devices"], result["nvidia_smi"]) == (1, 2, "agrees")
    assert result["names"] == ["NVIDIA H100 80GB HBM3"] and result["ecc"] and result["nvlink"]
    assert result["power_watts_max"] == pytest.approx(612.417) and result["xid_thread"]
    assert result["utilization_max"] == pytest.approx(0.87) and result["temperature_celsius"] == [61.0, 38.0]
    if shutil.which("promtool"):
        assert result["promtool"] == "ok"


def test_a_disagreement_with_nvidia_smi_fails_and_names_the_gpu(run_recorded: Any) -> None:
    totals = _recorded_totals()
    totals[1] -= 1024  # nvidia-smi says GPU 1 has 1 GiB less than NVML did
    rc, result = run_recorded(totals)
    assert rc == 1 and not result["ok"] and result["nvidia_smi"] == "disagrees"
    assert len(result["problems"]) == 1 and result["problems"][0].startswith("gpu 1 memory total")
