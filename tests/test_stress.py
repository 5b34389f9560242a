"""Random interleavings of steps and user edits, fused path against foreach (tests/stress_driver.py).

Each run is a subprocess with a time bound, so a crash or a hang fails the test; the
driver fails on the first step where the two paths disagree in result or in exception.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adopt import _fused

DRIVER = Path(__file__).with_name("stress_driver.py")


@pytest.mark.skipif(not _fused.fused_cpu_available(), reason="the C kernel was not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_random_edits_between_steps_match_foreach(threads: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "--threads", str(threads), "--seconds", "3", "--seed", str(10 * threads)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "steps compared" in proc.stdout
