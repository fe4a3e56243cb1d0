"""The 60-second chaos soak (bench/chaos.py, docs/reliability.md) passes: under worker kills,
web kills, Valkey restarts and pauses, no job is lost, duplicated, left unfinished or shown to
a watcher with a gap, and no process exits by itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.processes import ROOT

# In the default test command, so CI runs it on every change; `./dev test -m soak` runs it alone.
pytestmark = [pytest.mark.slow, pytest.mark.soak]


@pytest.mark.timeout(600)
def test_a_minute_of_chaos_breaks_no_promise() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--seconds", "60"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=540,
    )
    summary = result.stdout[-12_000:] + "\n" + result.stderr[-4_000:]
    assert "faults injected: 0 " not in result.stdout, f"no fault was injected:\n{summary}"
    assert result.returncode == 0, f"the soak found violations:\n{summary}"
