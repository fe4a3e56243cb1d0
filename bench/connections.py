"""Connections held: how many idle streams one web process holds, at what memory per stream,
how fast they connect, and whether every one of them still gets the next event.

    .venv/bin/python -m bench.connections                      # ours 19,000, baseline 9,000
    .venv/bin/python -m bench.connections --n 10000 --baseline-n 5000
    .venv/bin/python -m bench.connections --tokens             # one key's app, 10,000 viewers

``ulimit -n`` is 20,000 here (hard limit too), which caps one process at a little under 20,000
sockets; the baseline needs two descriptors per stream (the client's socket and its own Redis
pub/sub connection), so it caps near 9,900. The clients are spread over several load generator
processes (about 5,000 connections each).

``--tokens`` measures issue 13's "one key's app serves 10,000 concurrent viewers per web
process" with every limit at its default (100 streams per API key, 20 per stream token, 20,000
per process): our web processes run in production mode with one API key; the app mints one
stream token per viewer with that key (``POST /api/jobs/{id}/token``, on a second web process,
as an app's backend would), and each viewer opens the job's stream with ``?token=``. Then, in
the same run and on the same process, the same number of viewers try the key itself (the
``Authorization`` header), which the per-key limit caps: that is how every viewer counted when
all of an owner's streams counted together.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from bench.common import (
    PREFIX,
    Bench,
    LoadGen,
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
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.settings import Settings
from tests.support.processes import Web


@dataclass
class Held:
    n: int
    ready: int
    connect_per_s: float
    connect_cpu_ms: float  # the server's CPU per stream connected, while they connected
    kib_per_stream: float
    rss_mib: float
    fds: int
    idle_cpu_pct: float
    delivered: int
    p50: float
    p99: float
    max: float


def hold(
    run: Bench, control: Web, side: str, n: int, idle_seconds: float, resume: bool = False
) -> Held:
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
        header = None
        if resume and side == "ours":
            # A reconnect's path: the trim check and the catch-up after the job's first event.
            redis = run.redis()
            first = redis.xrange(Keys(PREFIX).job_events(job_id), count=1)[0][0]
            redis.close()
            header, marker = f"Last-Event-ID: {first}", "event: started"
        rss_before = rss_kib(pid)
        cpu_before = cpu_seconds(pid)
        gens = open_streams(run, server.port, path, marker, n, header=header)
        held, _ = measure(run, gens, pid, (rss_before, cpu_before), n, idle_seconds, job_id)
        return held
    finally:
        run.stop(server)


def open_streams(
    run: Bench,
    port: int,
    path: str,
    marker: str,
    n: int,
    *,
    header: str | None = None,
    tokens: list[str] | None = None,
) -> list[LoadGen]:
    """``n`` streams to ``path``, about 5,000 per load generator process; with ``tokens``,
    stream ``i`` sends ``?token=<tokens[i]>``."""
    gens = []
    first = 0
    for index, count in enumerate(split(n, max(1, math.ceil(n / 5000)))):
        args = ["sse", "--port", str(port), "--path", path, "--ready-marker", marker]
        args += ["--count", str(count), "--deadline", "120", "--ready-timeout", "180"]
        if header is not None:
            args += ["--header", header]
        if tokens is not None:
            file = run.log_dir / f"tokens-{port}-{index}.txt"
            file.write_text("\n".join(tokens[first : first + count]) + "\n", encoding="ascii")
            args += ["--tokens-file", str(file)]
        first += count
        gens.append(run.loadgen(*args))
    return gens


def measure(
    run: Bench,
    gens: list[LoadGen],
    pid: int,
    before: tuple[int, float],
    n: int,
    idle_seconds: float,
    job_id: str,
    before_event: Callable[[], None] | None = None,
) -> tuple[Held, Counter[str]]:
    """Wait until every stream is live (or refused), measure the held process, then send the
    job its one event and see who got it. ``before``: the process's RSS (KiB) and CPU seconds
    before the streams connected. Returns the figures and the streams' HTTP statuses."""
    rss_before, cpu_before = before
    readies = [g.read() for g in gens]
    connect_cpu = cpu_seconds(pid) - cpu_before
    ready = sum(r["ready"] for r in readies)
    connect_s = max(r["ready_s"] for r in readies)
    time.sleep(1.0)
    rss_after = rss_kib(pid)
    fds = open_fds(pid)
    cpu_before = cpu_seconds(pid)
    time.sleep(idle_seconds)
    idle_cpu = (cpu_seconds(pid) - cpu_before) / idle_seconds * 100
    if before_event is not None:
        before_event()
    redis = run.redis()
    redis.rpush(gate_key(job_id), "go")  # one progress event, then the job completes
    results = [g.read() for g in gens]
    redis.close()
    latencies = [x for r in results for x in r["latencies_ms"]]
    delivered = sum(1 for r in results for count in r["per_stream"] if count >= 1)
    statuses: Counter[str] = Counter()
    for r in results:
        statuses.update(r["statuses"])
    stats = summary(latencies)
    for gen in gens:
        gen.stop()
    held = Held(
        n=n,
        ready=ready,
        connect_per_s=ready / connect_s if connect_s else 0.0,
        connect_cpu_ms=connect_cpu / max(ready, 1) * 1000,
        kib_per_stream=(rss_after - rss_before) / max(ready, 1),
        rss_mib=rss_after / 1024,
        fds=fds,
        idle_cpu_pct=idle_cpu,
        delivered=delivered,
        p50=stats["p50"],
        p99=stats["p99"],
        max=stats["max"],
    )
    return held, statuses


# -- one key's app, its viewers on stream tokens (--tokens) ----------------------------------


@dataclass
class TokenRun:
    held: Held
    statuses: Counter[str]  # of the viewers' streams: "200", "429", ...
    minted: int
    mint_statuses: Counter[str]
    mints_per_s: float
    key_attempted: int
    key_statuses: Counter[str]  # of the same viewers opening the stream with the key itself


async def mint_tokens(
    base: str, job_id: str, auth: dict[str, str], n: int, concurrency: int
) -> tuple[list[str], Counter[str], float]:
    """``n`` stream tokens for one job, ``concurrency`` requests at a time, as an app's backend
    mints one per viewer. Returns the tokens, the responses' statuses and the seconds taken."""
    tokens: list[str] = []
    statuses: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=auth, limits=limits, timeout=30) as client:

        async def mint() -> None:
            async with gate:
                response = await client.post(f"/api/jobs/{job_id}/token")
            statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                tokens.append(response.json()["token"])

        started = time.monotonic()
        await asyncio.gather(*(mint() for _ in range(n)))
        return tokens, statuses, time.monotonic() - started


def hold_tokens(run: Bench, n: int, key_n: int, idle_seconds: float, concurrency: int) -> TokenRun:
    key = "sk_" + secrets.token_urlsafe(32)
    auth = {"Authorization": f"Bearer {key}"}
    production = {
        "STEPSTREAM_MODE": "production",
        "STEPSTREAM_SECRET": secrets.token_hex(32),
        "STEPSTREAM_API_KEYS": f"app:{key}",
    }
    # The app's backend: submits with its key and mints tokens; any web process of the
    # deployment can (tokens are signed with the shared secret), so the measured one only
    # holds streams, as in the other runs.
    backend = run.default_web(**production)
    server = run.default_web(**production)
    assert server.proc is not None
    pid = server.proc.pid
    try:
        # No worker yet: the job waits queued while tokens are minted and streams connect, so
        # the gated task's 60 s wait for its gate cannot run out before the event is sent.
        job_id = submit(backend.url, "gated", {"events": 1}, auth)["id"]
        tokens, mint_statuses, mint_s = asyncio.run(
            mint_tokens(backend.url, job_id, auth, n, concurrency)
        )
        if len(tokens) < n:
            raise RuntimeError(f"only {len(tokens)} of {n} tokens minted: {dict(mint_statuses)}")
        path = f"/api/jobs/{job_id}/events"
        rss_before = rss_kib(pid)
        cpu_before = cpu_seconds(pid)
        gens = open_streams(run, server.port, path, "event: snapshot", n, tokens=tokens)

        def start_job() -> None:
            run.worker()
            wait_state(backend.url, job_id, {"running"}, headers=auth)
            time.sleep(0.3)

        held, statuses = measure(
            run,
            gens,
            pid,
            (rss_before, cpu_before),
            n,
            idle_seconds,
            job_id,
            before_event=start_job,
        )

        # Before: the same viewers on the key itself, on the same process, while a job runs.
        key_statuses: Counter[str] = Counter()
        if key_n:
            job_id = submit(backend.url, "gated", {"events": 1}, auth)["id"]
            wait_state(backend.url, job_id, {"running"}, headers=auth)
            gens = open_streams(
                run,
                server.port,
                f"/api/jobs/{job_id}/events",
                "event: snapshot",
                key_n,
                header=f"Authorization: Bearer {key}",
            )
            for gen in gens:
                gen.read()  # every stream live or refused
            redis = run.redis()
            redis.rpush(gate_key(job_id), "go")  # the job ends, and its live streams with it
            redis.close()
            for gen in gens:
                key_statuses.update(gen.read()["statuses"])
                gen.stop()
        return TokenRun(
            held=held,
            statuses=statuses,
            minted=len(tokens),
            mint_statuses=mint_statuses,
            mints_per_s=n / mint_s if mint_s else 0.0,
            key_attempted=key_n,
            key_statuses=key_statuses,
        )
    finally:
        run.stop(server)


def codes(statuses: Counter[str]) -> str:
    """``{"200": 9990, "429": 10}`` → ``200: 9,990, 429: 10`` (0: no response at all)."""
    return ", ".join(f"{code}: {count:,}" for code, count in sorted(statuses.items()))


def report_tokens(result: TokenRun) -> None:
    h = result.held
    defaults = Settings.model_fields
    limits = (
        f"{defaults['max_streams_per_key'].default:,} per key, "
        f"{defaults['max_streams_per_token'].default:,} per token, "
        f"{defaults['max_streams'].default:,} per process"
    )
    print(f"\nlimits: the defaults ({limits}); production mode, one API key")
    refused = h.n - h.ready
    print_table(
        "One key's app: viewers of one job on one web process, one stream token each "
        "(latency in ms)",
        [
            "viewers",
            "tokens minted",
            "mints/s",
            "connected",
            "refused",
            "statuses",
            "connects/s",
            "web CPU ms per connect",
            "KiB/stream",
            "RSS MiB",
            "fds",
            "idle CPU %",
            "got the event",
            "p50",
            "p99",
            "max",
        ],
        [
            [
                fmt(h.n),
                f"{result.minted:,} ({codes(result.mint_statuses)})",
                fmt(result.mints_per_s, 0),
                fmt(h.ready),
                fmt(refused),
                codes(result.statuses),
                fmt(h.connect_per_s, 0),
                fmt(h.connect_cpu_ms, 3),
                fmt(h.kib_per_stream),
                fmt(h.rss_mib),
                fmt(h.fds),
                fmt(h.idle_cpu_pct),
                f"{h.delivered:,}/{h.n:,}",
                fmt(h.p50),
                fmt(h.p99),
                fmt(h.max),
            ]
        ],
    )
    if result.key_attempted:
        ks = result.key_statuses
        print(
            f"\nbefore (every viewer on the key itself, as when all of a key's streams counted "
            f"together): {result.key_attempted:,} attempted with the key header, "
            f"{ks.get('200', 0):,} connected, {ks.get('429', 0):,} got 429 ({codes(ks)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.connections", description=__doc__)
    parser.add_argument(
        "--n", type=int, help="streams held by our web process (19,000; --tokens: 10,000)"
    )
    parser.add_argument("--baseline-n", type=int, help="9,000; --tokens: 0 (it runs alone)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds held idle")
    parser.add_argument(
        "--tokens",
        action="store_true",
        help="one API key's app, production mode, default limits: a stream token per viewer",
    )
    parser.add_argument(
        "--key-n", type=int, help="--tokens: viewers then tried on the key itself (default --n)"
    )
    parser.add_argument(
        "--mint-concurrency", type=int, default=50, help="--tokens: token requests at a time"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="our streams connect with Last-Event-ID (a reconnect), not for a snapshot",
    )
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    if args.tokens:
        if args.baseline_n:
            parser.error("--tokens runs alone: run the baseline without it")
        n = args.n if args.n is not None else 10_000
        key_n = args.key_n if args.key_n is not None else n
        with bench(keep_logs=args.keep_logs) as run:
            result = hold_tokens(run, n, key_n, args.idle, args.mint_concurrency)
        report_tokens(result)
        return
    if args.n is None:
        args.n = 19_000
    if args.baseline_n is None:
        args.baseline_n = 9_000
    with bench(keep_logs=args.keep_logs) as run:
        control = run.web()
        run.worker()
        results = [("ours", hold(run, control, "ours", args.n, args.idle, args.resume))]
        if args.baseline_n:
            results.append(("baseline", hold(run, control, "baseline", args.baseline_n, args.idle)))
            if args.baseline_n != args.n:
                results.append(
                    ("ours", hold(run, control, "ours", args.baseline_n, args.idle, args.resume))
                )
    rows = [
        [
            side,
            fmt(h.n),
            fmt(h.ready),
            fmt(h.connect_per_s, 0),
            fmt(h.connect_cpu_ms, 3),
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
            "web CPU ms per connect",
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
