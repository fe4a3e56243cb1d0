"""Polling versus SSE: the same job watched by N clients, either polling ``GET /api/jobs/{id}``
every 2 s (keep-alive connections) or holding one SSE stream each.

Staleness of an event for a client: from the event's ``at`` to the first moment that client
knows it (an SSE frame arrives, or a poll answers with that event's id or a later one). Polling
clients skip events between two polls; they count as known at the first poll that is past them.

    .venv/bin/python -m bench.polling                  # 1,000 clients, 10 events at 1/s
    .venv/bin/python -m bench.polling --n 2000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime

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
    split,
    submit,
    wait_state,
)
from stepstream.tasks.models import parse_stream_id
from tests.support.processes import Web


@dataclass
class Watched:
    mode: str
    requests_per_s: float
    cpu_pct: float
    mean_staleness_ms: float
    p99_staleness_ms: float
    known: int
    expected: int


def events_of(run: Bench, job_id: str) -> list[tuple[tuple[int, int], float, str]]:
    """(id, at as epoch seconds, type) of every event in the job's log."""
    redis = run.redis()
    rows = redis.xrange(f"bench:job:{{{job_id}}}:events")
    redis.close()
    out = []
    for entry_id, fields in rows:
        event = json.loads(fields["e"])
        at = datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()
        out.append((parse_stream_id(entry_id), at, event["type"]))
    return out


def watch(run: Bench, web: Web, mode: str, n: int, events: int, rate: float) -> Watched:
    assert web.proc is not None
    job = submit(web.url, "gated", {"events": events})
    job_id = job["id"]
    wait_state(web.url, job_id, {"running"})
    time.sleep(0.3)
    duration = events / rate + 3
    procs = max(1, math.ceil(n / 2500))
    if mode == "poll":
        gens = [
            run.loadgen(
                "poll",
                "--port",
                str(web.port),
                "--path",
                f"/api/jobs/{job_id}",
                "--count",
                str(k),
                "--interval",
                "2",
                "--duration",
                str(duration),
            )
            for k in split(n, procs)
        ]
    else:
        gens = [
            run.loadgen(
                "sse",
                "--port",
                str(web.port),
                "--path",
                f"/api/jobs/{job_id}/events",
                "--ready-marker",
                "event: snapshot",
                "--count",
                str(k),
                "--deadline",
                str(duration + 30),
            )
            for k in split(n, procs)
        ]
    for gen in gens:
        gen.read()
    cpu_before = cpu_seconds(web.proc.pid)
    started = time.time()
    redis = run.redis()
    pace(events, rate, lambda i: redis.rpush(gate_key(job_id), "go"))
    results = [g.read() for g in gens]
    elapsed = time.time() - started
    cpu = cpu_seconds(web.proc.pid) - cpu_before
    redis.close()
    for gen in gens:
        gen.stop()

    log = [e for e in events_of(run, job_id) if e[2] == "progress"]
    staleness: list[float] = []
    expected = len(log) * n
    if mode == "poll":
        for result in results:
            for observations in result["observations"]:
                seen = [(t, parse_stream_id(i)) for t, i in observations]
                for event_id, at, _ in log:
                    first = next((t for t, i in seen if i >= event_id), None)
                    if first is not None:
                        staleness.append((first - at) * 1000)
        answered = sum(len(obs) for r in results for obs in r["observations"])
        rps = answered / max(r["elapsed_s"] for r in results)
    else:
        staleness = [x for r in results for x in r["latencies_ms"]]
        rps = 0.0  # each client's one request was made before the events began, and held open
    staleness.sort()
    return Watched(
        mode=mode,
        requests_per_s=rps,
        cpu_pct=cpu / elapsed * 100,
        mean_staleness_ms=sum(staleness) / len(staleness) if staleness else float("nan"),
        p99_staleness_ms=staleness[int(0.99 * (len(staleness) - 1))] if staleness else 0.0,
        known=len(staleness),
        expected=expected,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.polling", description=__doc__)
    parser.add_argument("--n", type=int, default=1_000)
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    with bench(keep_logs=args.keep_logs) as run:
        run.worker()
        poll_web = run.web()
        poll = watch(run, poll_web, "poll", args.n, args.events, args.rate)
        run.stop(poll_web)
        sse_web = run.web()
        sse = watch(run, sse_web, "sse", args.n, args.events, args.rate)
    rows = [
        [
            w.mode if w.mode == "sse" else "poll every 2 s",
            fmt(args.n),
            fmt(w.requests_per_s),
            fmt(w.cpu_pct),
            fmt(w.mean_staleness_ms),
            fmt(w.p99_staleness_ms),
            f"{w.known}/{w.expected}",
        ]
        for w in (poll, sse)
    ]
    rows.append(
        [
            "ratio (poll / SSE)",
            "",
            ratio(poll.requests_per_s, sse.requests_per_s),
            ratio(poll.cpu_pct, sse.cpu_pct),
            ratio(poll.mean_staleness_ms, sse.mean_staleness_ms),
            ratio(poll.p99_staleness_ms, sse.p99_staleness_ms),
            "",
        ]
    )
    print_table(
        f"Polling vs SSE: {args.events} events at {args.rate:g}/s (staleness in ms)",
        [
            "watching by",
            "clients",
            "requests/s",
            "server CPU %",
            "mean staleness",
            "p99 staleness",
            "events known",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
