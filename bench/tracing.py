"""What tracing costs (docs/observability.md): submissions per second and events per second
through one task, with tracing off, on with sampling at 0, and on with every trace kept.

Each setting gets its own web process and worker on an emptied Valkey:

- Submissions: ``POST /api/jobs`` from 32 keep-alive connections for a few seconds (no worker,
  so the jobs stay queued). On, each one makes a request span and a submit span, and stores
  the submit span's context with the job.
- Events: the ``burst`` task's ``progress()`` in a tight loop (one step, so one step span and
  one attempt span around thousands of events), as ``bench.throughput`` measures it.

Spans go over OTLP/HTTP to a receiver in this process that decodes them (tests/support/otlp.py),
so the exporter does its real work. Sampling at 0 is ``OTEL_TRACES_SAMPLER=parentbased_always_off``:
spans are made but not recorded or sent.

    .venv/bin/python -m bench.tracing
"""

from __future__ import annotations

import argparse
import json
import time

from bench.common import bench, fmt, machine, print_table
from bench.throughput import submissions, through_context
from tests.support.otlp import OtlpReceiver

SETTINGS: list[tuple[str, dict[str, str]]] = [
    ("off", {"STEPSTREAM_TRACING": "off"}),
    ("on, sampling 0", {"OTEL_TRACES_SAMPLER": "parentbased_always_off"}),
    ("on, every trace", {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    receiver = OtlpReceiver().start()
    rows = []
    try:
        with bench(keep_logs=args.keep_logs) as run:
            for name, extra in SETTINGS:
                env = dict(extra)
                if extra.get("STEPSTREAM_TRACING") != "off":
                    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url)
                redis = run.redis()
                redis.flushall()
                web = run.web(**env)
                body = json.dumps({"task": "burst", "input": {"events": 1}})
                rate, _ = submissions(run, web.port, "/api/jobs", body, args.seconds)
                redis.flushall()  # the queued submissions: the worker starts on an empty queue
                redis.close()
                worker = run.worker(**env)
                time.sleep(1)
                events = through_context(run, web.url, args.events)
                run.stop(worker)
                run.stop(web)
                time.sleep(0.5)  # the exporters' last batches
                rows.append((name, rate, events, len(receiver.snapshot())))
                receiver.spans.clear()
    finally:
        receiver.stop()

    off_submit, off_events = rows[0][1], rows[0][2]
    print_table(
        "Tracing's cost (higher is better)",
        ["tracing", "submissions/s", "vs off", f"events/s ({args.events:,})", "vs off", "spans"],
        [
            [
                name,
                fmt(rate, 0),
                f"{rate / off_submit:.2f}",
                fmt(events, 0),
                f"{events / off_events:.2f}",
                str(spans),
            ]
            for name, rate, events, spans in rows
        ],
    )


if __name__ == "__main__":
    main()
