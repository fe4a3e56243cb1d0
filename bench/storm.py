"""A reconnect storm: kill a web process holding N streams of a running job; its viewers come
back on a second web process with ``Last-Event-ID``.

Each viewer (``bench.loadgen storm``) reconnects to the second process as soon as its connection
drops, as Stepstream's clients do after a stream that worked (``--wait-retry``: after the
stream's ``retry:`` times a random 0.8-1.0, as they do when that first try finds nothing
listening: a lone web process restarting in place), and again with the clients' backoff when
refused or closed before its first event. The job writes one event every 1/rate s throughout.
Reported: how long after the kill each viewer got its first event id on the new connection (live
again: the catch-up is sent once its subscription holds), and, against the job's log, each
viewer's gaps and duplicates. Web CPU per connect: the second process's CPU time (user + system)
from the kill to the end of ``--watch``, less what the live frames cost in that time (the
process's CPU per second with every viewer connected, measured over the next 2 s, times each
viewer's time connected), over the viewers back.

    .venv/bin/python -m bench.storm --n 2000
    .venv/bin/python -m bench.storm --n 10000     # if the machine allows (two loadgen processes
                                                  # per 5,000; ulimit -n per process)
"""

from __future__ import annotations

import argparse
import signal
import threading
import time

from bench.common import (
    bench,
    cpu_seconds,
    fmt,
    machine,
    print_table,
    submit,
    summary,
    wait_state,
)
from bench.fanout import profile
from tests.support.tasks import gate_key

# Seconds after the watch over which the cost of the live frames alone is measured.
RATE_WINDOW = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=10.0, help="events per second")
    parser.add_argument("--kill-after", type=float, default=1.0, help="seconds of live events")
    parser.add_argument("--watch", type=float, default=10.0, help="seconds after the kill")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--profile", metavar="PATH", help="py-spy the second process to PATH")
    parser.add_argument(
        "--wait-retry", action="store_true", help="viewers wait retry: x 0.8-1.0 first"
    )
    args = parser.parse_args()
    events = int((args.kill_after + args.watch + 5) * args.rate) + 10

    print(f"machine: {machine()}")
    with bench(keep_logs=args.keep_logs) as run:
        doomed = run.web()
        survivor = run.web()
        run.worker()
        job_id = submit(survivor.url, "gated", {"events": events})["id"]
        wait_state(survivor.url, job_id, {"running"})
        path = f"/api/jobs/{job_id}/events"
        gens = run.stream_clients(
            "storm",
            args.n,
            *("--port", str(doomed.port), "--port2", str(survivor.port), "--path", path),
            *("--ready-marker", "event: snapshot"),
            *("--deadline", str(args.kill_after + args.watch + 60)),
            *(["--wait-retry"] if args.wait_retry else []),
        )
        ready = sum(g.read()["ready"] for g in gens)
        redis = run.redis()
        pushed = 0
        stop = threading.Event()

        def pace() -> None:
            nonlocal pushed
            start = time.monotonic()
            while not stop.is_set() and pushed < events - 1:
                delay = start + pushed / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                redis.rpush(gate_key(job_id), "go")
                pushed += 1

        pacer = threading.Thread(target=pace, daemon=True)
        pacer.start()
        time.sleep(args.kill_after)
        spy = None
        if args.profile:
            assert survivor.proc is not None
            spy = profile(survivor.proc.pid, args.profile)
        assert survivor.proc is not None
        cpu_before = cpu_seconds(survivor.proc.pid)
        killed_at = time.time()
        doomed.kill()
        time.sleep(args.watch)
        web_cpu = cpu_seconds(survivor.proc.pid) - cpu_before
        # Then every viewer is on the survivor: its CPU per second for their live frames.
        time.sleep(RATE_WINDOW)
        live_cpu_per_s = (cpu_seconds(survivor.proc.pid) - cpu_before - web_cpu) / RATE_WINDOW
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
        stop.set()
        pacer.join(timeout=10)
        for _ in range(events - pushed):
            redis.rpush(gate_key(job_id), "go")  # the rest at once: the job ends, streams close
        results = [g.read() for g in gens]
        log = [entry_id for entry_id, _ in redis.xrange(f"bench:job:{{{job_id}}}:events")]
        redis.close()

    relive = [t - killed_at for r in results for t in r["relive_at"] if t is not None]
    never = args.n - len(relive)
    gaps = duplicates = 0
    position = {entry_id: i for i, entry_id in enumerate(log)}
    for r in results:
        for ids in r["ids"]:
            if len(set(ids)) != len(ids):
                duplicates += 1
            if not ids or ids[0] not in position:
                gaps += 1
                continue
            if ids != log[position[ids[0]] : position[ids[0]] + len(ids)] or ids[-1] != log[-1]:
                gaps += 1
    stats = summary(relive)
    # What the viewers' live frames cost in the watch, at the rate measured with all of them
    # connected, for the time each one was: the rest is their connects.
    connected_s = sum(max(0.0, args.watch - t) for t in relive)
    connect_cpu = web_cpu - live_cpu_per_s * connected_s / args.n
    statuses: dict[str, int] = {}
    for r in results:
        for status, count in r["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    print_table(
        f"Reconnect storm: {args.n:,} viewers of one job, their web process killed; back on "
        "another with Last-Event-ID (seconds from the kill to the first event on the new "
        "connection)",
        [
            "viewers",
            "ready",
            "live again",
            "within 5 s",
            "p50 s",
            "p99 s",
            "max s",
            "viewers with a gap",
            "with a duplicate",
            "web CPU ms per connect",
            "statuses",
        ],
        [
            [
                fmt(args.n),
                fmt(ready),
                fmt(len(relive)),
                fmt(sum(1 for x in relive if x <= 5.0)),
                fmt(stats["p50"], 2),
                fmt(stats["p99"], 2),
                fmt(stats["max"], 2),
                fmt(gaps),
                fmt(duplicates),
                fmt(connect_cpu / max(len(relive), 1) * 1000, 3),
                str(statuses) + (f", {never} never back" if never else ""),
            ]
        ],
    )


if __name__ == "__main__":
    main()
