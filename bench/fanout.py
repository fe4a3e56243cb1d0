"""Fan-out latency per event type: N clients stream one job, next to the floor and the recipe.

The worker runs the ``staged`` task: 4 steps of 5 progress events each, every event released by
the benchmark at 10/s, so ``step``, ``progress``, ``step_completed`` and ``completed`` are each
timed. Latency runs from the event's ``at`` (stamped by the worker just before its append) to the
moment the client process receives the frame. Three servers, one after the other in the same
run, each in a fresh process, against the same Valkey, worker and client (``bench.loadgen``):

- ``floor``: ``bench/floor.py``, a bare uvloop writer (no framework, no Redis client);
- ``ours``: Stepstream's ``/api/jobs/{id}/events``;
- ``recipe``: ``bench/baseline_app.py``, sse-starlette + one Redis pub/sub connection per client.

Each server streams ``--jobs`` jobs (5) one after the other, N fresh clients each; each type's
p50/p99/max pools their events. A job has one terminal event, so over one job the
``completed`` p99 is a single fan-out's, one moment of a noisy machine.

    .venv/bin/python -m bench.fanout                          # N = 1,000 and 5,000
    .venv/bin/python -m bench.fanout --n 10000 --sides floor,ours
    .venv/bin/python -m bench.fanout --n 1000 --repeat 3

The recipe needs two descriptors per stream (the client's socket and its Redis connection), so
with ``ulimit -n`` 20,000 it cannot hold 10,000 streams in one process; it is left out past 9,000.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    Bench,
    bench,
    cpu_seconds,
    fmt,
    gate_key,
    machine,
    pace,
    print_table,
    rss_kib,
    submit,
    summary,
    wait_state,
)
from tests.support.processes import Web

FD_LIMIT_BASELINE = 9_000  # streams; two descriptors each, plus Valkey's maxclients


EVENT_TYPES = ("progress", "step", "step_completed", "completed")
SIDES = ("floor", "ours", "recipe")
STEPS = 4  # the `staged` task's steps (tests/support/tasks.py)
JOBS = 5  # per server and N: five fan-outs of the terminal event (see the module doc)


def profile(pid: int, path: str) -> subprocess.Popen[bytes]:
    """py-spy (pip install py-spy) sampling the server while the events go out."""
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "-p",
            str(pid),
            "-r",
            "200",
            "--format",
            "raw",
            "-o",
            path,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_side(
    run: Bench,
    control: Web,
    worker_pid: int,
    side: str,
    n: int,
    events: int,
    rate: float,
    jobs: int,
    profile_to: str | None = None,
) -> Figures:
    """``jobs`` jobs one after the other, each streamed by ``n`` fresh clients of one server
    process; latencies are pooled per event type, the memory and connect figures are the first
    job's (later ones reuse what the first freed)."""
    if side == "ours":
        server = run.web()
    elif side == "floor":
        server = run.floor()
    else:
        server = run.baseline()
    assert server.proc is not None
    pid = server.proc.pid
    try:
        spy = profile(pid, f"{profile_to}-{side}-{n}.txt") if profile_to else None
        rounds = [
            one_job(run, control, server.port, pid, worker_pid, side, n, events, rate)
            for _ in range(jobs)
        ]
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
    finally:
        run.stop(server)
    first = rounds[0]
    return Figures(
        latencies_by_type={
            type_: [x for r in rounds for x in r.latencies_by_type[type_]] for type_ in EVENT_TYPES
        },
        delivered=sum(r.delivered for r in rounds),
        expected=sum(r.expected for r in rounds),
        kib_per_stream=first.kib_per_stream,
        cpu_s=sum(r.cpu_s for r in rounds),
        connect_s=first.connect_s,
        connect_cpu_s=first.connect_cpu_s,
        worker_cpu_s=sum(r.worker_cpu_s for r in rounds),
    )


@dataclass
class Figures:
    """What ``n`` clients of one job saw and cost, or a server's jobs pooled (``run_side``)."""

    latencies_by_type: dict[str, list[float]]
    delivered: int
    expected: int
    kib_per_stream: float
    cpu_s: float
    connect_s: float
    connect_cpu_s: float
    worker_cpu_s: float


def one_job(
    run: Bench,
    control: Web,
    port: int,
    pid: int,
    worker_pid: int,
    side: str,
    n: int,
    events: int,
    rate: float,
) -> Figures:
    # Every event of `staged` waits for a push to its gate: steps, progress, the end.
    per_step = max(1, events // STEPS)
    job = submit(control.url, "staged", {"progress_per_step": per_step})
    job_id = job["id"]
    wait_state(control.url, job_id, {"running"})
    gates = pushes(events)
    path = f"/api/jobs/{job_id}/events" if side == "ours" else f"/events/{job_id}"
    # Ours is live once its snapshot is out (events before it are in the snapshot); the
    # others once their pub/sub subscription is made (they send `retry:` right after).
    marker = "event: snapshot" if side == "ours" else "retry:"
    rss_before = rss_kib(pid)
    connect_cpu_before = cpu_seconds(pid)
    deadline = gates / rate + 30 + n / 1000
    gens = run.stream_clients(
        "sse",
        n,
        *("--port", str(port), "--path", path, "--ready-marker", marker),
        *("--deadline", str(deadline), "--by-type"),
    )
    readies = [g.read() for g in gens]
    ready = sum(r["ready"] for r in readies)
    if ready < n:
        print(f"  {side} N={n}: only {ready} streams ready")
    time.sleep(1.0)
    rss_after = rss_kib(pid)
    cpu_before = cpu_seconds(pid)
    connect_cpu = cpu_before - connect_cpu_before
    worker_before = cpu_seconds(worker_pid)
    redis = run.redis()
    pace(gates, rate, lambda i: redis.rpush(gate_key(job_id), "go"))
    results = [g.read() for g in gens]
    cpu = cpu_seconds(pid) - cpu_before
    worker_cpu = cpu_seconds(worker_pid) - worker_before
    redis.close()
    delivered = sum(sum(r["per_stream"]) for r in results)
    events = per_step * STEPS
    if delivered < n * events:
        counts = Counter(c for r in results for c in r["per_stream"])
        statuses: Counter[str] = Counter()
        for r in results:
            statuses.update(r["statuses"])
        still_open = sum(r["still_open"] for r in results)
        print(
            f"  {side} N={n}: events per stream {dict(counts)}, HTTP statuses "
            f"{dict(statuses)}, {still_open} streams still open at the deadline"
        )
        if os.environ.get("BENCH_DEBUG"):
            for r in results:
                for sample, count in zip(r["samples"], r["per_stream"], strict=False):
                    print(f"    {count}: {sample}")
    for gen in gens:
        gen.stop()
    return Figures(
        latencies_by_type={
            type_: [x for r in results for x in r["latencies_by_type"].get(type_, [])]
            for type_ in EVENT_TYPES
        },
        delivered=delivered,
        expected=n * events,
        kib_per_stream=(rss_after - rss_before) / n,
        cpu_s=cpu,
        connect_s=max(r["ready_s"] for r in readies),
        connect_cpu_s=connect_cpu,
        worker_cpu_s=worker_cpu,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("--n", default="1000,5000", help="client counts, comma separated")
    parser.add_argument("--events", type=int, default=20, help="progress events (4 steps)")
    parser.add_argument("--rate", type=float, default=10.0, help="events per second")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--jobs",
        type=int,
        default=JOBS,
        help="jobs per server and N, one after the other (each type's p99 pools their events)",
    )
    parser.add_argument(
        "--sides", default=",".join(SIDES), help=f"servers to measure, of {', '.join(SIDES)}"
    )
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--profile", metavar="PREFIX", help="py-spy the servers to PREFIX-*.txt")
    args = parser.parse_args()
    counts = [int(x) for x in args.n.split(",")]
    sides = [s for s in args.sides.split(",") if s]

    print(f"machine: {machine()}")
    rows: list[list[str]] = []
    summary_rows: list[list[str]] = []
    with bench(keep_logs=args.keep_logs) as run:
        control = run.web()
        worker = run.worker()
        assert worker.proc is not None
        for n in counts:
            for _ in range(args.repeat):
                # server -> event type -> p50, p99, max
                stats_by_side: dict[str, dict[str, dict[str, float]]] = {}
                for side in sides:
                    if side == "recipe" and n > FD_LIMIT_BASELINE:
                        continue
                    load = os.getloadavg()[0]
                    result = run_side(
                        run,
                        control,
                        worker.proc.pid,
                        side,
                        n,
                        args.events,
                        args.rate,
                        args.jobs,
                        args.profile,
                    )
                    by_type = {t: summary(result.latencies_by_type[t]) for t in EVENT_TYPES}
                    stats_by_side[side] = by_type
                    floor = stats_by_side.get("floor")
                    for type_ in EVENT_TYPES:
                        stats = by_type[type_]
                        base = floor[type_]["p99"] if floor else float("nan")
                        rows.append(
                            [
                                fmt(n),
                                side,
                                type_,
                                fmt(stats["p50"]),
                                fmt(stats["p99"]),
                                fmt(stats["max"]),
                                _times(stats["p99"], base),
                                f"{load:.2f}",
                            ]
                        )
                    summary_rows.append(
                        [
                            fmt(n),
                            side,
                            f"{result.delivered}/{result.expected}",
                            _times(by_type["completed"]["p99"], by_type["progress"]["p99"]),
                            fmt(result.kib_per_stream),
                            fmt(result.cpu_s, 2),
                            # CPU per frame delivered (events x streams), per connect, and the
                            # worker's per event written.
                            fmt(result.cpu_s / (n * args.jobs * pushes(args.events)) * 1e6),
                            fmt(result.connect_s, 2),
                            fmt(n / result.connect_s, 0) if result.connect_s else "n/a",
                            fmt(result.connect_cpu_s / n * 1e6),
                            fmt(result.worker_cpu_s / (args.jobs * pushes(args.events)) * 1e3, 2),
                        ]
                    )
                print_table(
                    f"Fan-out per event type: {STEPS} steps, {args.events} progress events, "
                    f"{args.rate:g} events/s, N clients (latency in ms, worker append -> client "
                    "receipt; x floor: p99 / the floor's p99 of that type in the same run)",
                    ["N", "server", "event", "p50", "p99", "max", "p99 x floor", "load"],
                    rows,
                )
                print_table(
                    "Per server (completed/progress: the terminal event's p99 over progress's)",
                    [
                        "N",
                        "server",
                        "progress delivered",
                        "completed/progress p99",
                        "KiB/stream",
                        "CPU s",
                        "CPU us/frame",
                        "connect s",
                        "connects/s",
                        "CPU us/connect",
                        "worker CPU ms/event",
                    ],
                    summary_rows,
                )


def pushes(events: int) -> int:
    """Events the `staged` task writes for ``events`` progress events (gate pushes)."""
    per_step = max(1, events // STEPS)
    return STEPS * (per_step + 2) + 1


def _times(value: float, reference: float) -> str:
    if reference != reference or value != value or reference <= 0:
        return "n/a"
    return f"{value / reference:.2f}x"


if __name__ == "__main__":
    main()
