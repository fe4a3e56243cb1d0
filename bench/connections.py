"""Connections held: how many idle streams one web process holds, at what memory per stream,
how fast they connect, and whether every one of them still gets the next event.

    .venv/bin/python -m bench.connections                      # ours 19,000, baseline 9,000
    .venv/bin/python -m bench.connections --n 10000 --baseline-n 5000

``ulimit -n`` is 20,000 here (hard limit too), which caps one process at a little under 20,000
sockets; the baseline needs two descriptors per stream (the client's socket and its own Redis
pub/sub connection), so it caps near 9,900. The clients are spread over several load generator
processes (about 5,000 connections each).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

from bench.common import (
    Bench,
    bench,
    cpu_seconds,
    fmt,
    gate_key,
    machine,
    open_fds,
    print_table,
    ratio,
    rss_kib,
    split,
    submit,
    summary,
    wait_state,
)
from tests.support.processes import Web


@dataclass
class Held:
    n: int
    ready: int
    connect_per_s: float
    kib_per_stream: float
    rss_mib: float
    fds: int
    idle_cpu_pct: float
    delivered: int
    p50: float
    p99: float
    max: float


def hold(run: Bench, control: Web, side: str, n: int, idle_seconds: float) -> Held:
    server = run.web() if side == "ours" else run.baseline()
    assert server.proc is not None
    pid = server.proc.pid
    try:
        job = submit(control.url, "gated", {"events": 1})
        job_id = job["id"]
        wait_state(control.url, job_id, {"running"})
        time.sleep(0.3)
        path = f"/api/jobs/{job_id}/events" if side == "ours" else f"/events/{job_id}"
        # Ours is live once its snapshot is out (events before it are in the snapshot); the
        # baseline once its pub/sub subscription is made (it sends `retry:` right after).
        marker = "event: snapshot" if side == "ours" else "retry:"
        rss_before = rss_kib(pid)
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
                "120",
                "--ready-timeout",
                "180",
            )
            for k in split(n, max(1, math.ceil(n / 5000)))
        ]
        readies = [g.read() for g in gens]
        ready = sum(r["ready"] for r in readies)
        connect_s = max(r["ready_s"] for r in readies)
        time.sleep(1.0)
        rss_after = rss_kib(pid)
        fds = open_fds(pid)
        cpu_before = cpu_seconds(pid)
        time.sleep(idle_seconds)
        idle_cpu = (cpu_seconds(pid) - cpu_before) / idle_seconds * 100
        redis = run.redis()
        redis.rpush(gate_key(job_id), "go")  # one progress event, then the job completes
        results = [g.read() for g in gens]
        redis.close()
        latencies = [x for r in results for x in r["latencies_ms"]]
        delivered = sum(1 for r in results for count in r["per_stream"] if count >= 1)
        stats = summary(latencies)
        for gen in gens:
            gen.stop()
        return Held(
            n=n,
            ready=ready,
            connect_per_s=ready / connect_s if connect_s else 0.0,
            kib_per_stream=(rss_after - rss_before) / max(ready, 1),
            rss_mib=rss_after / 1024,
            fds=fds,
            idle_cpu_pct=idle_cpu,
            delivered=delivered,
            p50=stats["p50"],
            p99=stats["p99"],
            max=stats["max"],
        )
    finally:
        run.stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.connections", description=__doc__)
    parser.add_argument("--n", type=int, default=19_000, help="streams held by our web process")
    parser.add_argument("--baseline-n", type=int, default=9_000)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds held idle")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    with bench(keep_logs=args.keep_logs) as run:
        control = run.web()
        run.worker()
        results = [("ours", hold(run, control, "ours", args.n, args.idle))]
        if args.baseline_n:
            results.append(("baseline", hold(run, control, "baseline", args.baseline_n, args.idle)))
            if args.baseline_n != args.n:
                results.append(("ours", hold(run, control, "ours", args.baseline_n, args.idle)))
    rows = [
        [
            side,
            fmt(h.n),
            fmt(h.ready),
            fmt(h.connect_per_s, 0),
            fmt(h.kib_per_stream),
            fmt(h.rss_mib),
            fmt(h.fds),
            fmt(h.idle_cpu_pct),
            f"{h.delivered}/{h.n}",
            fmt(h.p50),
            fmt(h.p99),
            fmt(h.max),
        ]
        for side, h in results
    ]
    base = next((h for side, h in results if side == "baseline"), None)
    same_n = next(
        (h for side, h in results if side == "ours" and base is not None and h.n == base.n), None
    )
    print_table(
        "Idle streams held by one web process, then one event to all of them (latency in ms)",
        [
            "server",
            "streams",
            "ready",
            "connects/s",
            "KiB/stream",
            "RSS MiB",
            "fds",
            "idle CPU %",
            "got the event",
            "p50",
            "p99",
            "max",
        ],
        rows,
    )
    if base is not None and same_n is not None:
        print(
            f"\nat {base.n:,} streams: memory per stream "
            f"{ratio(base.kib_per_stream, same_n.kib_per_stream)} less, p99 of one event "
            f"{ratio(base.p99, same_n.p99)} lower"
        )


if __name__ == "__main__":
    main()
