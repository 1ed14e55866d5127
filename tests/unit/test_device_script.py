"""benchmarks/device.sh (the prepared GPU run) runs on the CPU at tiny shapes, so it cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_device_script_runs_on_cpu_at_tiny_shapes() -> None:
    env = {**os.environ, "DEVICE": "cpu", "TINY": "1", "LAYERS": "1", "OUT": "-", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all checks passed" in proc.stdout
    assert "| ties → r16 |" in proc.stdout
    assert "== done" in proc.stdout
