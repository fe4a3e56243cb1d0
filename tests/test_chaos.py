"""The 40-second chaos soak (bench/chaos/, docs/reliability.md) passes: under worker kills,
web kills, Valkey restarts and pauses, no job is lost, duplicated, left unfinished or shown to
a watcher with a gap, and no process exits by itself. So does a 30-second one with the log plane
on a Valkey Cluster whose primaries are SIGKILLed (``--cluster``).

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


# The log plane on a 3+3 Valkey Cluster: each round of faults begins with a primary's SIGKILL
# (its replica promoted, the node restarted as a replica), so 4 faults bring at least one.
CLUSTER_SOAK = ["--cluster", "--seconds", "30", "--fault-min", "2", "--fault-max", "4"]
CLUSTER_SOAK += ["--min-faults", "4", "--in-flight", "8", "--watchers", "4"]


def soak(args: list[str]) -> tuple[subprocess.CompletedProcess[str], str]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.chaos", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=540,
    )
    return result, result.stdout[-12_000:] + "\n" + result.stderr[-4_000:]


def summary_count(pattern: str, stdout: str) -> int | None:
    found = re.search(pattern, stdout, re.MULTILINE)
    return None if found is None else int(found[1])


@pytest.mark.timeout(600)
def test_forty_seconds_of_chaos_break_no_promise() -> None:
    result, summary = soak(SOAK)
    injected = summary_count(r"^faults injected: (\d+)", result.stdout)
    # A soak that injected too few faults tested too little, however it ended.
    assert injected is not None and injected >= 6, f"too few faults injected:\n{summary}"
    assert result.returncode == 0, f"the soak found violations:\n{summary}"


@pytest.mark.timeout(600)
def test_chaos_with_cluster_primaries_killed_breaks_no_promise() -> None:
    """Every event of every job seen once by its watchers, every job ended, while cluster
    primaries are SIGKILLed under the log plane (and workers, webs and the queue's Valkey)."""
    result, summary = soak(CLUSTER_SOAK)
    kills = summary_count(r"^primary kills: (\d+)", result.stdout)
    # No failover: nothing this test is for was tested (the soak says so as a violation too).
    assert kills is not None and kills >= 1, f"no primary was killed:\n{summary}"
    assert "gaps 0, duplicates 0, lost jobs 0, jobs stuck 0" in result.stdout, summary
    assert result.returncode == 0, f"the soak found violations:\n{summary}"
