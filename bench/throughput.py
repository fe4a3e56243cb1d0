"""Throughput: submissions per second, appended events per second, and submit -> started.

- Submissions: ``POST /api/jobs`` from 32 keep-alive connections for a few seconds, against one
  web process (no worker, so the jobs stay queued). Baseline: the common recipe's submit, a
  Starlette endpoint that only enqueues an arq job (``POST /jobs`` in ``bench/baseline_app.py``):
  no record, no event log, no validation.
- Appends: ``JobStore.append`` (one Lua script per event: both streams, the record, publish)
  called from this process, one at a time and from 16 coroutines; ``JobStore.append_many``
  with 50 events of one job per call (the same script); and through the task context in a
  worker (the ``burst`` task: ``progress()`` in a tight loop, whose events the job's
  ``EventWriter`` gathers while an append is answered). Baseline: a bare ``PUBLISH`` per event,
  which keeps no log at all.
- Submit -> started on an idle worker: from just before the POST to the ``at`` of the job's
  ``started`` event; and what the idle worker costs while it waits (its CPU, and its queue
  reads in Valkey). Ours is woken by the submit and polls every 0.5 s otherwise
  (tasks/wakeups.py). Baselines: arq's own worker (``arq stepstream.tasks.worker.WorkerSettings``)
  polling every 10 ms, as Stepstream's worker did before wake-ups, and at arq's default 0.5 s.

    .venv/bin/python -m bench.throughput
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from bench.common import (
    Bench,
    bench,
    fmt,
    machine,
    percentile,
    print_table,
    ratio,
    submit,
    wait_state,
)
from bench.fanout import profile
from stepstream.tasks.models import JobState
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore, new_event
from tests.support.processes import Worker
from tests.support.records import running_record


def at_epoch(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# -- submissions -----------------------------------------------------------------------------


def submissions(run: Bench, port: int, path: str, body: str, seconds: float) -> tuple[float, Any]:
    gen = run.loadgen(
        "post",
        "--port",
        str(port),
        "--path",
        path,
        "--body",
        body,
        "--concurrency",
        "32",
        "--duration",
        str(seconds),
    )
    gen.read()
    result = gen.read()
    gen.stop()
    ok = sum(v for k, v in result["statuses"].items() if k in ("200", "202"))
    return ok / result["elapsed_s"], result


# -- appends ---------------------------------------------------------------------------------


async def make_jobs(store: JobStore, count: int) -> list[str]:
    ids = []
    for i in range(count):
        job_id = f"append-bench-{i}-{time.time_ns()}"
        appended = await store.create(
            running_record(job_id), new_event(job_id, "queued", 0, input={})
        )
        assert appended.ok
        ids.append(job_id)
    return ids


def progress_event(job_id: str, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    message = f"event {i}"
    event = new_event(job_id, "progress", 1, current=i, total=1_000_000, message=message)
    return event, {"progress": 0.5, "message": message}


async def appends_per_second(
    store: JobStore, ids: list[str], concurrency: int, seconds: float
) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def writer(job_id: str) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < end:
            event, fields = progress_event(job_id, i)
            appended = await store.append(job_id, event, fields, expect=(JobState.running,))
            assert appended.ok
            i += 1
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(writer(ids[k % len(ids)]) for k in range(concurrency)))
    return done / (time.perf_counter() - start)


async def batched_appends_per_second(
    store: JobStore, ids: list[str], batch: int, seconds: float
) -> float:
    """``JobStore.append_many`` with ``batch`` events per call, one call at a time."""
    done = calls = 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    i = 0
    while time.perf_counter() < end:
        job_id = ids[calls % len(ids)]
        events = []
        fields: dict[str, Any] = {}
        for _ in range(batch):
            event, fields = progress_event(job_id, i)
            events.append(event)
            i += 1
        appended = await store.append_many(job_id, events, fields, expect=(JobState.running,))
        assert appended.ok
        done += batch
        calls += 1
    return done / (time.perf_counter() - start)


async def publish_per_second(redis: Redis, channel: str, seconds: float) -> float:
    done = 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    payload = json.dumps(progress_event("baseline", 1)[0])
    while time.perf_counter() < end:
        await redis.publish(channel, payload)
        done += 1
    return done / (time.perf_counter() - start)


BATCH = 50  # events per append_many call in the batched figure


async def script_usec_per_call(redis: Redis) -> float:
    stats = await redis.info("commandstats")
    scripts = [v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")]
    calls = sum(v["calls"] for v in scripts)
    return sum(v["usec"] for v in scripts) / calls if calls else 0.0


async def store_figures(url: str, seconds: float) -> dict[str, float]:
    settings = Settings(redis_url=url, prefix="bench:")
    redis = Redis.from_url(url, decode_responses=True)
    store = JobStore(redis, settings)
    try:
        ids = await make_jobs(store, 16)
        await redis.config_resetstat()
        figures = {
            "sequential": await appends_per_second(store, ids, 1, seconds),
            "concurrent": await appends_per_second(store, ids, 16, seconds),
        }
        # What one append costs Valkey itself: the ceiling of one Redis, whatever the clients.
        figures["redis_usec"] = await script_usec_per_call(redis)
        await redis.config_resetstat()
        figures["batched"] = await batched_appends_per_second(store, ids, BATCH, seconds)
        figures["batched_redis_usec"] = await script_usec_per_call(redis) / BATCH
        figures["publish"] = await publish_per_second(redis, "bench:baseline-channel", seconds)
        return figures
    finally:
        await redis.aclose()


def through_context(run: Bench, base: str, events: int) -> float:
    job = submit(base, "burst", {"events": events})
    wait_state(base, job["id"], {"completed", "failed"}, timeout=120)
    redis = run.redis()
    rows = redis.xrange(f"bench:job:{{{job['id']}}}:events")
    redis.close()
    events_in_log = [json.loads(fields["e"]) for _, fields in rows]
    progress = [e for e in events_in_log if e["type"] == "progress"]
    # The log keeps the newest ``job_log_maxlen`` events: those kept are the last, all there.
    currents = [e["current"] for e in progress]
    assert currents == list(range(events - len(progress) + 1, events + 1)), "no event lost"
    completed = next(e for e in events_in_log if e["type"] == "completed")
    # From the first kept progress event's stamp to ``completed``, which is stamped only after
    # the writer has stored every event before it: the rate at which events reached the log.
    return len(progress) / (at_epoch(completed["at"]) - at_epoch(progress[0]["at"]))


# -- submit -> started -----------------------------------------------------------------------


def submit_to_started(run: Bench, base: str, samples: int) -> tuple[list[float], list[float]]:
    """Submit -> started, and the worker's part of it (the job's queued.at -> started.at)."""
    redis = run.redis()
    pubsub = redis.pubsub()
    pubsub.subscribe("bench:live")
    pubsub.get_message(timeout=1)
    latencies = []
    pickup = []
    # One client for every sample: a new httpx.Client builds an SSL context (milliseconds).
    client = httpx.Client(base_url=base, timeout=10)
    for _ in range(samples):
        time.sleep(0.05)  # the worker is idle again
        sent = time.time()
        response = client.post("/api/jobs", json={"task": "burst", "input": {"events": 1}})
        job = response.json()
        deadline = time.monotonic() + 10
        queued_at = sent
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1)
            if message is None or message["type"] != "message":
                continue
            event = json.loads(message["data"])["event"]
            if event["job_id"] == job["id"] and event["type"] == "queued":
                queued_at = at_epoch(event["at"])
            if event["job_id"] == job["id"] and event["type"] == "started":
                latencies.append((at_epoch(event["at"]) - sent) * 1000)
                pickup.append((at_epoch(event["at"]) - queued_at) * 1000)
                break
    client.close()
    pubsub.close()
    redis.close()
    return latencies, pickup


# The worker of each submit -> started row: a name, the command (None: `stepstream worker`) and
# its poll delay.
ARQ_CLI = [sys.executable, "-m", "arq", "stepstream.tasks.worker.WorkerSettings"]
WORKERS: list[tuple[str, list[str] | None, str]] = [
    ("ours (woken, polls every 500 ms)", None, "0.5"),
    ("arq polling every 10 ms", ARQ_CLI, "0.01"),
    ("arq polling every 500 ms (default)", ARQ_CLI, "0.5"),
]


def idle_cost(run: Bench, worker: Worker, seconds: float) -> tuple[float, float]:
    """What an idle worker costs: its CPU (% of one core) and its queue reads per second."""
    assert worker.proc is not None
    stat = Path(f"/proc/{worker.proc.pid}/stat")
    redis = run.redis()

    def cpu() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    time.sleep(1)  # the last sample's job has ended
    redis.config_resetstat()
    before, started = cpu(), time.monotonic()
    time.sleep(seconds)
    spent, elapsed = cpu() - before, time.monotonic() - started
    reads = redis.info("commandstats").get("cmdstat_zrangebyscore", {}).get("calls", 0)
    redis.close()
    return spent / elapsed * 100, reads / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--burst", type=int, default=5_000)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument(
        "--submissions-only", action="store_true", help="ours and the bare enqueue, then stop"
    )
    parser.add_argument("--profile", metavar="PATH", help="py-spy our web process's submissions")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    with bench(keep_logs=args.keep_logs) as run:
        web = run.web()
        baseline = run.baseline()
        body = json.dumps({"task": "burst", "input": {"events": 1}})
        spy = None
        if args.profile:
            assert web.proc is not None
            spy = profile(web.proc.pid, args.profile)
        ours_submit, ours_raw = submissions(run, web.port, "/api/jobs", body, args.seconds)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
        base_submit, base_raw = submissions(run, baseline.port, "/jobs", body, args.seconds)
        run.stop(baseline)
        if args.submissions_only:
            print(
                f"submissions/s, one web process: ours {ours_submit:,.0f}, bare arq enqueue "
                f"{base_submit:,.0f} ({ours_submit / base_submit:.2f}x); p50 ms ours "
                f"{percentile(ours_raw['latencies_ms'], 50):.1f}, enqueue "
                f"{percentile(base_raw['latencies_ms'], 50):.1f}"
            )
            return

        figures = asyncio.run(store_figures(run.valkey.url, args.seconds))

        worker = run.worker()
        time.sleep(1)
        # The queued jobs from the submission test run first; wait for them to drain.
        context_rate = through_context(run, web.url, args.burst)
        idle: dict[str, tuple[list[float], list[float], float, float]] = {}
        for name, argv, poll_delay in WORKERS:
            if argv is not None or worker is None:
                worker = run.worker(argv, STEPSTREAM_POLL_DELAY_SECONDS=poll_delay)
                time.sleep(1)
            latencies, pickup = submit_to_started(run, web.url, args.samples)
            idle[name] = (latencies, pickup, *idle_cost(run, worker, args.idle_seconds))
            run.stop(worker)
            worker = None

    batched_usec = figures["batched_redis_usec"]
    print_table(
        "Throughput (higher is better)",
        ["what", "ours", "baseline", "ratio", "baseline is"],
        [
            [
                "submissions/s, one web process",
                fmt(ours_submit, 0),
                fmt(base_submit, 0),
                f"{ours_submit / base_submit:.2f}x",
                "arq enqueue only, no record/log",
            ],
            [
                "submit p50 latency ms (32 in flight)",
                fmt(percentile(ours_raw["latencies_ms"], 50)),
                fmt(percentile(base_raw["latencies_ms"], 50)),
                "",
                "",
            ],
            [
                "appends/s, JobStore.append, sequential",
                fmt(figures["sequential"], 0),
                fmt(figures["publish"], 0),
                f"{figures['sequential'] / figures['publish']:.2f}x",
                "bare PUBLISH, sequential",
            ],
            [
                "appends/s, JobStore.append, 16 concurrent",
                fmt(figures["concurrent"], 0),
                "",
                "",
                "",
            ],
            [
                "Valkey CPU per append (µs) -> ceiling/s",
                f"{figures['redis_usec']:.1f} -> "
                f"{1e6 / figures['redis_usec'] if figures['redis_usec'] else 0:,.0f}",
                "",
                "",
                "INFO commandstats",
            ],
            [
                f"appends/s, JobStore.append_many, {BATCH} per call",
                fmt(figures["batched"], 0),
                fmt(figures["publish"], 0),
                f"{figures['batched'] / figures['publish']:.2f}x",
                "bare PUBLISH, sequential",
            ],
            [
                "Valkey CPU per batched event (µs) -> ceiling/s",
                f"{batched_usec:.1f} -> {1e6 / batched_usec if batched_usec else 0:,.0f}",
                "",
                "",
                "INFO commandstats",
            ],
            [
                f"events/s through the task context ({args.burst:,})",
                fmt(context_rate, 0),
                "",
                "",
                "",
            ],
        ],
    )
    print_table(
        "Submit -> started on an idle worker (ms, lower is better), and its cost while idle",
        [
            "worker",
            "p50",
            "p99",
            "max",
            "samples",
            "queued -> started p50",
            "idle CPU %",
            "reads/s",
        ],
        [
            [
                name,
                fmt(percentile(latencies, 50)),
                fmt(percentile(latencies, 99)),
                fmt(max(latencies)),
                fmt(len(latencies)),
                fmt(percentile(pickup, 50)),
                fmt(cpu),
                fmt(reads),
            ]
            for name, (latencies, pickup, cpu, reads) in idle.items()
        ],
    )
    ours, *baselines = idle.values()
    print("How many times more a baseline costs than ours (p50, p99, idle CPU, reads/s):")
    for (name, *_), (latencies, _, cpu, reads) in zip(WORKERS[1:], baselines, strict=True):
        print(
            f"  {name}: {ratio(percentile(latencies, 50), percentile(ours[0], 50))}, "
            f"{ratio(percentile(latencies, 99), percentile(ours[0], 99))}, "
            f"{ratio(cpu, ours[2])}, {ratio(reads, ours[3])}"
        )


if __name__ == "__main__":
    main()
