"""The 40-second chaos soak (bench/chaos/, docs/reliability.md) passes: under worker kills,
web kills, Valkey restarts and pauses, no job is lost, duplicated, left unfinished or shown to
a watcher with a gap, and no process exits by itself.

A fault every 2-4 s, so 40 s brings about as many (6-9) as the bench's 60 s at its default 3-7 s,
for two thirds of the time, and half the bench's load (12 jobs in flight, 6 watchers): the suite
is CPU-bound on 2 cores, and the bench's full load is a core. At least 6 faults, however long a
loaded machine makes them take."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.processes import ROOT

# In the default test command, so CI runs it on every change; `./dev test -m soak` runs it alone.
pytestmark = [pytest.mark.slow, pytest.mark.soak]


# On a loaded machine a fault takes longer (3 in 40 s once, at load 9): the soak then goes on
# until 6 are in, up to 120 s.
SOAK = ["--seconds", "40", "--fault-min", "2", "--fault-max", "4", "--min-faults", "6"]
SOAK += ["--in-flight", "12", "--watchers", "6"]


@pytest.mark.timeout(600)
def test_forty_seconds_of_chaos_break_no_promise() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.chaos", *SOAK],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=540,
    )
    summary = result.stdout[-12_000:] + "\n" + result.stderr[-4_000:]
    injected = re.search(r"^faults injected: (\d+)", result.stdout, re.MULTILINE)
    # A soak that injected too few faults tested too little, however it ended.
    assert injected is not None and int(injected[1]) >= 6, f"too few faults injected:\n{summary}"
    assert result.returncode == 0, f"the soak found violations:\n{summary}"
