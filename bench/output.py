"""Streamed step text (``output`` events, tasks/output.py): what a streamed reply costs.

Three figures, in one run against one Valkey (append-only file on, as deployed):

1. A 20,000-character reply (5,000 tokens of 4 characters, written at 2,000 tokens/s, nobody
   watching): ``output`` events stored, Redis bytes per 1,000 characters (the append-only
   file's growth, the bytes Valkey received, what the job's record, log and firehose entries
   take in memory) and the append script's time, beside the plain recipe, one ``PUBLISH`` per
   token, for the same tokens.
2. Events per reply at the default coalescing (one event per 50 ms at most), for a 2,000-token
   reply at two speeds.
3. Delta latency, from the model's write of a token to its arrival at each of N viewers
   (1,000 by default) of one streaming job: each token's text is its write time, so the
   coalescing wait is included. Ours (``/api/jobs/{id}/events``) and the baseline
   (``bench/baseline_app.py``: one Redis pub/sub connection per viewer, fed one message per
   token) run one after the other, each in a fresh web process.

    .venv/bin/python -m bench.output                  # about a minute and a half
    .venv/bin/python -m bench.output --viewers 100 --rate 100
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.common import (
    PREFIX,
    Bench,
    bench,
    fmt,
    gate_key,
    machine,
    print_table,
    submit,
    summary,
    wait_state,
)
from tests.support.processes import Web

TASKS = "tests.support.tasks,tests.support.output_tasks"


def redis_counters(r: Any) -> dict[str, float]:
    info = r.info("all")
    script = info.get("cmdstat_evalsha", {})
    return {
        "aof": float(info.get("aof_current_size", 0)),
        "net_in": float(info["total_net_input_bytes"]),
        "firehose": float(r.memory_usage("bench:events", samples=0) or 0),
        "script_calls": float(script.get("calls", 0)),
        "script_usec": float(script.get("usec", 0)),
    }


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in before}


def output_events(r: Any, job_id: str) -> list[dict[str, Any]]:
    rows = r.xrange(f"bench:job:{{{job_id}}}:events")
    events = [json.loads(fields["e"]) for _, fields in rows]
    return [e for e in events if e["type"] == "output"]


def cost_of_a_reply(run: Bench, control: Web, tokens: int) -> list[list[str]]:
    r = run.redis()
    time.sleep(1.5)  # the append-only file settles (fsync every second)
    before = redis_counters(r)
    job = submit(control.url, "token_stream", {"tokens": tokens, "rate": 2_000.0})
    done = wait_state(control.url, job["id"], {"completed"}, timeout=60)
    time.sleep(1.5)
    ours = delta(before, redis_counters(r))
    chars = len(done["steps"][0]["text"])
    assert chars == tokens * 4, chars
    # What stays: the record and the job's log, and the job's entries in the firehose.
    kept = ours["firehose"] + sum(
        float(r.memory_usage(key, samples=0) or 0)
        for key in (f"bench:job:{{{job['id']}}}", f"bench:job:{{{job['id']}}}:events")
    )
    events = len(output_events(r, job["id"]))
    # The plain recipe for the same tokens: one PUBLISH each, nothing kept.
    before = redis_counters(r)
    channel = "bench:plain"
    for i in range(tokens):
        payload = {"job_id": job["id"], "type": "output", "text": "tok ", "index": i}
        r.publish(channel, json.dumps(payload))
    time.sleep(1.5)
    plain = delta(before, redis_counters(r))
    r.close()
    per_k = 1_000 / chars
    return [
        [
            "ours (stored, replayable)",
            fmt(chars),
            fmt(events),
            fmt(ours["aof"] * per_k, 0),
            fmt(ours["net_in"] * per_k, 0),
            fmt(kept * per_k, 0),
            fmt(int(ours["script_calls"])),
            fmt(ours["script_usec"] / 1000, 1),
        ],
        [
            "plain: PUBLISH per token",
            fmt(chars),
            fmt(tokens),
            fmt(plain["aof"] * per_k, 0),
            fmt(plain["net_in"] * per_k, 0),
            "n/a (nothing kept)",
            "n/a",
            "n/a",
        ],
    ]


def events_row(
    tokens: int, rate: float, watched: str, done: dict[str, Any], events: int
) -> list[str]:
    # The reply's real length: a loaded machine writes slower than asked.
    seconds = (done["steps"][0]["duration_ms"] or 0) / 1000
    return [
        fmt(tokens),
        fmt(rate, 0),
        watched,
        fmt(seconds, 1),
        fmt(events),
        fmt(tokens / events, 1),
        fmt(seconds / events * 1000, 0),
    ]


def events_per_reply(run: Bench, control: Web, tokens: int, rate: float) -> list[str]:
    r = run.redis()
    job = submit(control.url, "token_stream", {"tokens": tokens, "rate": rate})
    done = wait_state(control.url, job["id"], {"completed"}, timeout=tokens / rate + 30)
    events = len(output_events(r, job["id"]))
    r.close()
    return events_row(tokens, rate, "no viewers", done, events)


def latency(
    run: Bench, control: Web, side: str, viewers: int, tokens: int, rate: float
) -> dict[str, Any]:
    server = run.web(STEPSTREAM_TASK_MODULES=TASKS) if side == "ours" else run.baseline()
    try:
        r = run.redis()
        if side == "ours":
            job = submit(
                control.url,
                "token_stream",
                {"tokens": tokens, "rate": rate, "stamp": True, "gate": True},
            )
            job_id = job["id"]
            wait_state(control.url, job_id, {"running"})
            time.sleep(0.3)  # the step's start has passed: viewers see only the deltas
            path, marker = f"/api/jobs/{job_id}/events", "event: snapshot"
        else:
            job_id = "plain-recipe"
            path, marker = f"/events/{job_id}", "retry:"
        deadline = tokens / rate + 20 + viewers / 500
        gens = run.stream_clients(
            "sse",
            viewers,
            *("--port", str(server.port), "--path", path, "--ready-marker", marker),
            *("--deadline", str(deadline), "--expect-type", "output", "--token-times"),
        )
        ready = sum(g.read()["ready"] for g in gens)
        time.sleep(1.0)
        if side == "ours":
            r.rpush(gate_key(job_id), "go")
            done = wait_state(control.url, job_id, {"completed"}, timeout=deadline)
            events = len(output_events(r, job_id))
            row = events_row(tokens, rate, f"{viewers:,} viewers", done, events)
        else:
            # The recipe's viewers listen on the job's sharded channel (bench/baseline_app.py).
            channel = f"{PREFIX}job:{{{job_id}}}:live"

            def publish(i: int) -> None:
                event = {"job_id": job_id, "type": "output", "text": f"{time.time():.6f} "}
                event["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                message = json.dumps({"job_event_id": f"{i + 1}-0", "event": event})
                r.execute_command("SPUBLISH", channel, message)

            # Paced as the model writes; a publisher that falls behind (each SPUBLISH goes to
            # every viewer's connection) stops at the deadline and says how far it got.
            start = time.monotonic()
            events = 0
            for i in range(tokens):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if time.monotonic() - start > deadline - 5:
                    break
                publish(i)
                events += 1
            end = {"job_id": job_id, "type": "completed", "at": "", "result": None}
            message = json.dumps({"job_event_id": f"{tokens + 1}-0", "event": end})
            r.execute_command("SPUBLISH", channel, message)
            publish_s = time.monotonic() - start
            row = [f"published {events:,} in {publish_s:.1f} s"]
        results = [g.read() for g in gens]
        for gen in gens:
            gen.stop()
        r.close()
        latencies = [x for res in results for x in res["latencies_ms"]]
        delivered = sum(sum(res["per_stream"]) for res in results)
        return {
            "ready": ready,
            "events": events,
            "delivered": delivered,
            "expected": viewers * tokens,
            "row": row,
            **summary(latencies),
        }
    finally:
        run.stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.output", description=__doc__)
    parser.add_argument("--viewers", type=int, default=1_000)
    parser.add_argument("--tokens", type=int, default=2_000, help="tokens per reply")
    parser.add_argument("--rate", type=float, default=200.0, help="tokens per second")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with bench(keep_logs=args.keep_logs) as run:
        control = run.web(STEPSTREAM_TASK_MODULES=TASKS)
        run.worker(STEPSTREAM_TASK_MODULES=TASKS)
        print_table(
            "A 20,000-character reply: what it writes to Redis (bytes per 1,000 characters)",
            [
                "recipe",
                "characters",
                "events/messages",
                "AOF bytes/1k",
                "bytes received/1k",
                "kept in memory/1k",
                "script calls",
                "script ms",
            ],
            cost_of_a_reply(run, control, 5_000),
        )
        events_rows = [events_per_reply(run, control, args.tokens, 1_000.0)]
        rows = []
        notes = []
        for side in ("ours", "baseline"):
            result = latency(run, control, side, args.viewers, args.tokens, args.rate)
            if side == "ours":
                events_rows.append(result["row"])
            else:
                notes.extend(result["row"])
            rows.append(
                [
                    side if side == "ours" else "plain: pub/sub message per token",
                    fmt(result["ready"]),
                    fmt(result["events"]),
                    f"{result['delivered']:,}/{result['expected']:,}",
                    fmt(result["p50"]),
                    fmt(result["p99"]),
                    fmt(result["max"]),
                ]
            )
        print_table(
            f"Delta latency, model write -> viewer, {args.viewers:,} viewers of one job, "
            f"{args.tokens:,} tokens at {args.rate:g}/s (ms)",
            ["recipe", "viewers", "events sent", "tokens delivered", "p50", "p99", "max"],
            rows,
        )
        print(f"\nplain recipe's publisher: {'; '.join(notes)}")
        print_table(
            "Events per reply at the default coalescing (at most one per 50 ms)",
            [
                "tokens",
                "tokens/s asked",
                "watched by",
                "reply s",
                "events",
                "tokens/event",
                "ms/event",
            ],
            events_rows,
        )


if __name__ == "__main__":
    main()
