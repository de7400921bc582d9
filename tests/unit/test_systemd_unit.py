"""deploy/systemd/milepost.service passes ``systemd-analyze verify`` and matches its environment file.

``verify`` checks that ExecStart's program exists and is executable, so the test writes a copy
of the unit whose ExecStart points at this venv's ``milepost`` script; everything else is the
committed text. Warnings (an unknown key, a bad value) count as failures.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "milepost.service"
ENV = ROOT / "deploy" / "systemd" / "milepost.env.example"
INSTALLED = "/opt/milepost/venv/bin/milepost"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is missing: apt-get install -y --no-install-recommends systemd")
    unit = tmp_path / "milepost.service"
    unit.write_text(text)
    return subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)


def _local_milepost() -> str:
    script = Path(sys.executable).parent / "milepost"
    assert script.exists(), f"{script}: the venv's milepost script (pip install -e .)"
    return str(script)


def test_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} run " in text
    out = _verify(tmp_path, text.replace(INSTALLED, _local_milepost()))
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ((INSTALLED, "/nonexistent/milepost"), "is not executable"),
        (("Restart=on-failure", "Restrat=on-failure"), "Unknown key"),
    ],
)
def test_verify_catches_a_broken_unit(tmp_path: Path, change: tuple[str, str], complaint: str) -> None:
    text = UNIT.read_text().replace(INSTALLED, _local_milepost())
    if change[0] == INSTALLED:
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={change[1]}", text, flags=re.M)
    else:
        text = text.replace(*change)
    out = _verify(tmp_path, text)
    assert complaint in out.stderr, out.stderr


def test_env_example_defines_what_the_unit_uses() -> None:
    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", UNIT.read_text()))
    defined = {line.split("=", 1)[0] for line in ENV.read_text().splitlines() if re.match(r"^[A-Z_]+=", line)}
    assert used <= defined, f"the unit uses {sorted(used - defined)} that the example does not define"
    assert "MILEPOST_TOKEN" in defined and "KillMode=process" in UNIT.read_text()
