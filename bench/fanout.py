"""Fan-out latency: N clients stream one job; the worker appends 20 progress events at 10/s.

Latency is measured from the event's ``at`` (stamped by the worker just before its append) to the
moment the client process receives the frame. Ours (``/api/jobs/{id}/events``) and the baseline
(``bench/baseline_app.py``: sse-starlette + one Redis pub/sub connection per client) run one
after the other in the same run, each in a fresh web process, against the same Valkey and worker.

    .venv/bin/python -m bench.fanout                 # N = 100, 1,000, 5,000
    .venv/bin/python -m bench.fanout --n 10000       # the largest (ours only: see below)
    .venv/bin/python -m bench.fanout --n 1000 --repeat 3

The baseline needs two descriptors per stream (the client's socket and its Redis connection), so
with ``ulimit -n`` 20,000 it cannot hold 10,000 streams in one process; that row is ours only.
"""

from __future__ import annotations

import argparse
import math
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
    ratio,
    rss_kib,
    split,
    submit,
    summary,
    wait_state,
)
from tests.support.processes import Web

FD_LIMIT_BASELINE = 9_000  # streams; two descriptors each, plus Valkey's maxclients


@dataclass
class SideResult:
    n: int
    p50: float
    p99: float
    max: float
    delivered: int
    expected: int
    kib_per_stream: float
    cpu_s: float
    connect_s: float


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
    side: str,
    n: int,
    events: int,
    rate: float,
    profile_to: str | None = None,
) -> SideResult:
    server = run.web() if side == "ours" else run.baseline()
    assert server.proc is not None
    pid = server.proc.pid
    try:
        job = submit(control.url, "gated", {"events": events})
        job_id = job["id"]
        wait_state(control.url, job_id, {"running"})
        time.sleep(0.3)  # let the `step` event pass
        path = f"/api/jobs/{job_id}/events" if side == "ours" else f"/events/{job_id}"
        # Ours is live once its snapshot is out (events before it are in the snapshot); the
        # baseline once its pub/sub subscription is made (it sends `retry:` right after).
        marker = "event: snapshot" if side == "ours" else "retry:"
        rss_before = rss_kib(pid)
        deadline = events / rate + 30 + n / 1000
        gens = [
            run.loadgen(
                "sse",
                "--port",
                str(server.port),
                "--path",
                path,
                "--ready-marker",
                marker,
                "--count",
                str(k),
                "--deadline",
                str(deadline),
            )
            for k in split(n, max(1, math.ceil(n / 2500)))
        ]
        readies = [g.read() for g in gens]
        ready = sum(r["ready"] for r in readies)
        if ready < n:
            print(f"  {side} N={n}: only {ready} streams ready")
        time.sleep(1.0)
        rss_after = rss_kib(pid)
        cpu_before = cpu_seconds(pid)
        spy = profile(pid, f"{profile_to}-{side}-{n}.txt") if profile_to else None
        redis = run.redis()
        pace(events, rate, lambda i: redis.rpush(gate_key(job_id), "go"))
        results = [g.read() for g in gens]
        cpu = cpu_seconds(pid) - cpu_before
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
        redis.close()
        latencies = [x for r in results for x in r["latencies_ms"]]
        delivered = sum(sum(r["per_stream"]) for r in results)
        stats = summary(latencies)
        if delivered < n * events:
            counts = Counter(c for r in results for c in r["per_stream"])
            statuses = Counter()
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
        return SideResult(
            n=n,
            p50=stats["p50"],
            p99=stats["p99"],
            max=stats["max"],
            delivered=delivered,
            expected=n * events,
            kib_per_stream=(rss_after - rss_before) / n,
            cpu_s=cpu,
            connect_s=max(r["ready_s"] for r in readies),
        )
    finally:
        run.stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("--n", default="100,1000,5000", help="client counts, comma separated")
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10.0, help="events per second")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--ours-only", action="store_true")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--profile", metavar="PREFIX", help="py-spy the servers to PREFIX-*.txt")
    args = parser.parse_args()
    counts = [int(x) for x in args.n.split(",")]

    print(f"machine: {machine()}")
    rows: list[list[str]] = []
    with bench(keep_logs=args.keep_logs) as run:
        control = run.web()
        run.worker()
        for n in counts:
            for _ in range(args.repeat):
                ours = run_side(run, control, "ours", n, args.events, args.rate, args.profile)
                base = None
                if not args.ours_only and n <= FD_LIMIT_BASELINE:
                    base = run_side(
                        run, control, "baseline", n, args.events, args.rate, args.profile
                    )
                rows.append(
                    [
                        fmt(n),
                        fmt(ours.p50),
                        fmt(ours.p99),
                        fmt(ours.max),
                        fmt(base.p50) if base else "n/a",
                        fmt(base.p99) if base else "n/a",
                        fmt(base.max) if base else "n/a",
                        ratio(base.p99, ours.p99) if base else "n/a",
                        f"{ours.delivered}/{ours.expected}",
                        f"{base.delivered}/{base.expected}" if base else "n/a",
                        fmt(ours.kib_per_stream),
                        fmt(base.kib_per_stream) if base else "n/a",
                        ratio(base.kib_per_stream, ours.kib_per_stream) if base else "n/a",
                        fmt(ours.cpu_s, 2),
                        fmt(base.cpu_s, 2) if base else "n/a",
                    ]
                )
                print_table(
                    f"Fan-out: {args.events} events at {args.rate:g}/s to N clients "
                    "(latency in ms, worker append -> client receipt)",
                    [
                        "N",
                        "ours p50",
                        "ours p99",
                        "ours max",
                        "base p50",
                        "base p99",
                        "base max",
                        "p99 ratio",
                        "ours delivered",
                        "base delivered",
                        "ours KiB/stream",
                        "base KiB/stream",
                        "mem ratio",
                        "ours CPU s",
                        "base CPU s",
                    ],
                    rows,
                )


if __name__ == "__main__":
    main()
