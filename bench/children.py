"""Child jobs (tasks/children.py): a parent that maps a task over N inputs, against the same work
submitted as a batch and merged by the caller; and what the roll-up costs per child.

For each of ``--repeat`` rounds, one after the other against the same Valkey and workers:

1. ``ctx.map``: submit one ``fan_out`` job (N ``fan_leaf`` children), wait for its result (the
   squares, merged by the parent, in input order).
2. The caller's way: ``POST /api/batches`` with the same N ``fan_leaf`` inputs, wait for the
   batch to complete, read its children's results in order (``GET /api/batches/{id}``) and
   merge them in the caller.

Each is timed from the submit to the merged result in the caller's hands. Per child, it counts
the parent's events (the ``child`` starts and ends, and the parent's own), the append-script
calls and every Redis command (Valkey's ``INFO commandstats``; idle workers' queue polls are in
both columns alike).

    .venv/bin/python -m bench.children                   # N = 50, 2 workers x 4 jobs, 3 rounds
    .venv/bin/python -m bench.children --n 200 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench.common import Bench, bench, fmt, machine, print_table, submit, wait_state
from tests.support import http

TASKS = "tests.support.tasks,tests.support.fanout_tasks"


def commands(r: Any) -> tuple[int, int]:
    """Every command Valkey has run so far, and the append script's calls among them."""
    stats = r.info("commandstats")
    total = sum(int(v.get("calls", 0)) for v in stats.values())
    script = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return total, script


def with_map(run: Bench, base: str, n: int, pace: float) -> dict[str, float]:
    r = run.redis()
    before = commands(r)
    started = time.perf_counter()
    job = submit(base, "fan_out", {"count": n, "pace": pace})
    done = wait_state(base, job["id"], {"completed", "failed"}, timeout=600)
    took = time.perf_counter() - started
    assert done["result"]["squares"] == [i * i for i in range(n)], done["state"]
    return _figures(r, before, took, job["id"])


def _figures(r: Any, before: tuple[int, int], took: float, parent_id: str) -> dict[str, float]:
    """One run's figures; closes ``r``."""
    after = commands(r)
    parent_events = r.xlen(f"bench:job:{{{parent_id}}}:events")
    r.close()
    return {
        "seconds": took,
        "parent_events": parent_events,
        "calls": after[0] - before[0],
        "scripts": after[1] - before[1],
    }


def as_batch(run: Bench, base: str, n: int, pace: float) -> dict[str, float]:
    r = run.redis()
    before = commands(r)
    started = time.perf_counter()
    inputs = [{"n": i, "pace": pace} for i in range(n)]
    response = http.post(
        f"{base}/api/batches", json={"task": "fan_leaf", "inputs": inputs}, timeout=30
    )
    response.raise_for_status()
    batch_id = response.json()["id"]
    wait_state(base, batch_id, {"completed"}, timeout=600)
    children = http.get(f"{base}/api/batches/{batch_id}", timeout=30).json()["children"]
    squares = [c["result"]["square"] for c in sorted(children, key=lambda c: c["index"])]
    took = time.perf_counter() - started
    assert squares == [i * i for i in range(n)]
    return _figures(r, before, took, batch_id)


def row(name: str, runs: list[dict[str, float]], n: int) -> list[str]:
    seconds = [run["seconds"] for run in runs]
    return [
        name,
        fmt(statistics.median(seconds), 2),
        fmt(min(seconds), 2),
        fmt(statistics.median(run["parent_events"] for run in runs) / n, 2),
        fmt(statistics.median(run["scripts"] for run in runs) / n, 1),
        fmt(statistics.median(run["calls"] for run in runs) / n, 1),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50, help="children per parent (batch size)")
    parser.add_argument("--pace", type=float, default=0.02, help="seconds a child sleeps, twice")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-jobs", type=int, default=4, help="jobs at once per worker")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    with bench() as run:
        env = {"STEPSTREAM_TASK_MODULES": TASKS, "STEPSTREAM_MAX_JOBS": str(args.max_jobs)}
        web = run.web(**env)
        for _ in range(args.workers):
            run.worker(**env)
        with_map(run, web.url, 5, 0.0)  # warm up: imports, scripts loaded
        mapped, batched = [], []
        for _ in range(args.repeat):
            mapped.append(with_map(run, web.url, args.n, args.pace))
            batched.append(as_batch(run, web.url, args.n, args.pace))
    print_table(
        f"{args.n} children of {2 * args.pace:g}s each, {args.workers} workers x "
        f"{args.max_jobs} jobs, {args.repeat} rounds (median)",
        [
            "way",
            "to the merged result (s)",
            "fastest (s)",
            "parent events / child",
            "script calls / child",
            "Redis commands / child",
        ],
        [
            row("ctx.map in a parent job", mapped, args.n),
            row("a batch, merged by the caller", batched, args.n),
        ],
    )


if __name__ == "__main__":
    main()
