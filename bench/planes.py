"""Submit -> started on an idle worker: the logs on one Valkey, and on a Valkey Cluster with
arq's queue on that Valkey (``STEPSTREAM_CLUSTER_URL``; docs/scaling.md, "Two planes").

On one Valkey the create's script writes the arq entry itself. On a cluster it writes the entry
into its partition's queue outbox, and the web process writes it to arq right after (one more
round trip to each plane); the idle worker is woken by the entry either way. Measured from just
before the POST to the ``at`` of the job's ``started`` event (read back from its stream), one
job at a time, 50 ms apart; and the submit's own round trip.

    .venv/bin/python -m bench.planes            # about half a minute
"""

from __future__ import annotations

import argparse
import json
import time

import httpx
from httpx_sse import connect_sse

from bench.common import Bench, bench, fmt, machine, percentile, print_table
from bench.throughput import at_epoch
from tests.support.cluster import ValkeyCluster


def submit_to_started(base: str, samples: int) -> tuple[list[float], list[float]]:
    """(submit -> started, the POST's own time), in ms, one job at a time."""
    latencies: list[float] = []
    posts: list[float] = []
    with httpx.Client(base_url=base, timeout=10) as client:
        for _ in range(samples + 3):  # the first three warm the connections up
            time.sleep(0.05)  # the worker is idle again
            sent = time.time()
            job = client.post("/api/jobs", json={"task": "burst", "input": {"events": 1}})
            answered = time.time()
            job_id = job.json()["id"]
            started = None
            with connect_sse(client, "GET", f"/api/jobs/{job_id}/events?after=0") as source:
                for sse in source.iter_sse():
                    event = json.loads(sse.data) if sse.data else {}
                    if event.get("type") == "started":
                        started = at_epoch(event["at"])
                        break
            assert started is not None, f"job {job_id} never started"
            latencies.append((started - sent) * 1000)
            posts.append((answered - sent) * 1000)
    return latencies[3:], posts[3:]


def measure(run: Bench, samples: int, **env: str) -> tuple[list[float], list[float]]:
    web = run.web(**env)
    worker = run.worker(**env)
    try:
        time.sleep(1)
        return submit_to_started(web.url, samples)
    finally:
        run.stop(worker)
        run.stop(web)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.planes", description=__doc__)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--primaries", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rows = []
    with bench() as run:
        one = measure(run, args.samples)
        cluster = ValkeyCluster(run.log_dir / "cluster", primaries=args.primaries, replicas=0)
        cluster.start()
        try:
            two = measure(run, args.samples, STEPSTREAM_CLUSTER_URL=cluster.url)
        finally:
            cluster.stop()
    for name, (latencies, posts) in (
        ("one Valkey", one),
        (f"queue on one Valkey, logs on a {args.primaries}-primary cluster", two),
    ):
        rows.append(
            [
                name,
                fmt(percentile(latencies, 50)),
                fmt(percentile(latencies, 90)),
                fmt(percentile(posts, 50)),
            ]
        )
    print_table(
        f"Submit -> started on an idle worker ({args.samples} jobs each, ms)",
        ["log plane", "p50", "p90", "the POST alone, p50"],
        rows,
    )


if __name__ == "__main__":
    main()
