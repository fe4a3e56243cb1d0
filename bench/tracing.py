"""What tracing costs (docs/observability.md): submissions per second and events per second
through one task, with tracing off, on with sampling at 0, and on with every trace kept.

Each setting gets its own web process and worker on an emptied Valkey:

- Submissions: ``POST /api/jobs`` from 32 keep-alive connections for a few seconds (no worker,
  so the jobs stay queued). On, each one makes a request span and a submit span, and stores
  the submit span's context with the job.
- Events: the ``burst`` task's ``progress()`` in a tight loop (one step, so one step span and
  one attempt span around thousands of events), as ``bench.throughput`` measures it.
- CPU per submit: the spans a submission makes (request, submit, its stored context), timed
  in a process of their own: the part of the cost that the machine's other load does not blur.

All settings run side by side and take turns, round after round; the figures are medians.

Spans go over OTLP/HTTP to a receiver in this process that decodes them (tests/support/otlp.py),
so the exporter does its real work. Sampling at 0 is ``OTEL_TRACES_SAMPLER=parentbased_always_off``:
spans are made but not recorded or sent.

    .venv/bin/python -m bench.tracing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.common import Bench, bench, fmt, machine, print_table, submit, wait_state
from bench.throughput import at_epoch, submissions
from tests.support.otlp import OtlpReceiver
from tests.support.processes import ROOT, Web

SETTINGS: list[tuple[str, dict[str, str]]] = [
    ("off", {"STEPSTREAM_TRACING": "off"}),
    ("on, sampling 0", {"OTEL_TRACES_SAMPLER": "parentbased_always_off"}),
    ("on, every trace", {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}),
]


def events_per_second(run: Bench, web: Web, prefix: str, events: int) -> float:
    """``bench.throughput.through_context`` for one key prefix: the rate at which the burst
    task's events reached the log, from its first kept progress event to ``completed``."""
    job = submit(web.url, "burst", {"events": events})
    wait_state(web.url, job["id"], {"completed", "failed"}, timeout=120)
    redis = run.redis()
    rows = redis.xrange(f"{prefix}job:{{{job['id']}}}:events")
    redis.close()
    logged = [json.loads(fields["e"]) for _, fields in rows]
    progress = [e for e in logged if e["type"] == "progress"]
    completed = next(e for e in logged if e["type"] == "completed")
    return len(progress) / (at_epoch(completed["at"]) - at_epoch(progress[0]["at"]))


def span_work_usec(count: int) -> float:
    """In this process: the tracing a submission does (a request span, the submit span as its
    child, the carrier stored with the job, both ended), in microseconds of CPU each."""
    from stepstream.tasks import tracing

    started = time.process_time()
    for _ in range(count):
        request = tracing.start_span("POST", {"http.request.method": "POST"}, kind="server")
        with request.current():
            submit_span = tracing.start_span("submit burst", {"stepstream.job_id": "x" * 20})
            submit_span.carrier()
            submit_span.end("1-0")
        request.end()
    return (time.process_time() - started) / count * 1e6


def span_cost(env: dict[str, str], count: int) -> float:
    """``span_work_usec`` in a fresh process with ``env``'s tracing setting."""
    code = f"from bench.tracing import span_work_usec; print(span_work_usec({count}))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.5, help="per submission round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--spans", type=int, default=5_000, help="submissions' spans, timed")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    receiver = OtlpReceiver().start()
    body = json.dumps({"task": "burst", "input": {"events": 1}})
    prefixes = [f"bench{i}:" for i in range(len(SETTINGS))]
    envs = []
    for prefix, (_, extra) in zip(prefixes, SETTINGS, strict=True):
        env = {"STEPSTREAM_PREFIX": prefix, **extra}
        if extra.get("STEPSTREAM_TRACING") != "off":
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url
        envs.append(env)
    submitted: list[list[float]] = [[] for _ in SETTINGS]
    through: list[list[float]] = [[] for _ in SETTINGS]
    try:
        with bench(keep_logs=args.keep_logs) as run:
            # All settings side by side, taking turns round after round: the machine's other
            # load falls on each alike.
            webs = [run.web(**env) for env in envs]
            for _ in range(args.rounds):
                for i, web in enumerate(webs):
                    rate, _ = submissions(run, web.port, "/api/jobs", body, args.seconds)
                    submitted[i].append(rate)
            redis = run.redis()
            redis.flushall()  # the queued submissions: each worker starts on an empty queue
            redis.close()
            for env in envs:
                run.worker(**env)
            time.sleep(1)
            for _ in range(args.rounds):
                for i, web in enumerate(webs):
                    through[i].append(events_per_second(run, web, prefixes[i], args.events))
        time.sleep(0.5)  # the exporters' last batches, sent as the processes stopped
        spans = len(receiver.snapshot())
        work = [
            statistics.median(span_cost(env, args.spans) for _ in range(args.rounds))
            for env in envs
        ]
    finally:
        receiver.stop()

    median = statistics.median
    off_submit, off_events = median(submitted[0]), median(through[0])
    print_table(
        f"Tracing's cost: medians of {args.rounds} rounds (higher is better)",
        [
            "tracing",
            "submissions/s",
            "vs off",
            f"events/s ({args.events:,})",
            "vs off",
            "CPU per submit (µs)",
        ],
        [
            [
                name,
                fmt(median(submitted[i]), 0),
                f"{median(submitted[i]) / off_submit:.2f}",
                fmt(median(through[i]), 0),
                f"{median(through[i]) / off_events:.2f}",
                fmt(work[i], 1),
            ]
            for i, (name, _) in enumerate(SETTINGS)
        ],
    )
    print(f"spans received: {spans:,} (all from the fully traced processes)")


if __name__ == "__main__":
    main()
