"""Resume: how long a client reconnecting with ``Last-Event-ID`` takes to receive the 1,000 or
10,000 events it missed (through the job's terminal event, when the server ends the response).

Ours (``/api/jobs/{id}/events``) reads the log in batches of 1,000 and sends each batch as one
write. Baseline (``/replay/{id}`` in ``bench/baseline_app.py``): the same ``XRANGE`` batches,
one ``ServerSentEvent`` encoded and sent per event, as sse-starlette code usually does.
Time runs from opening the connection to the last byte; each figure is the median of 5.

    .venv/bin/python -m bench.resume
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

from bench.common import Bench, bench, fmt, machine, print_table, ratio, submit, wait_state


def fetch(port: int, path: str, last_event_id: str) -> tuple[float, int]:
    """Seconds from connect to the end of the response, and the events it carried."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            f"Last-Event-ID: {last_event_id}\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
    elapsed = time.perf_counter() - started
    body = b"".join(chunks)
    return elapsed, body.replace(b"\r\n", b"\n").count(b"\nevent: ")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__)
    parser.add_argument("--missed", default="1000,10000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    missed = [int(x) for x in args.missed.split(",")]

    print(f"machine: {machine()}")
    rows = []
    with bench(keep_logs=args.keep_logs) as run:
        env = {"STEPSTREAM_JOB_LOG_MAXLEN": "50000"}
        web = run.web(**env)
        baseline = run.baseline(**env)
        run.worker(**env)
        job = submit(web.url, "burst", {"events": max(missed) + 10})
        wait_state(web.url, job["id"], {"completed"}, timeout=180)
        ids = [entry_id for entry_id, _ in _log(run, job["id"])]
        for k in missed:
            cursor = ids[len(ids) - 1 - k]  # exactly k events follow, the last is `completed`
            ours = [
                fetch(web.port, f"/api/jobs/{job['id']}/events", cursor) for _ in range(args.repeat)
            ]
            base = [
                fetch(baseline.port, f"/replay/{job['id']}", cursor) for _ in range(args.repeat)
            ]
            ours_ms = statistics.median(t for t, _ in ours) * 1000
            base_ms = statistics.median(t for t, _ in base) * 1000
            rows.append(
                [
                    fmt(k),
                    fmt(ours_ms),
                    fmt(base_ms),
                    ratio(base_ms, ours_ms),
                    f"{min(n for _, n in ours)}/{k}",
                    f"{min(n for _, n in base)}/{k}",
                    fmt(k / (ours_ms / 1000), 0),
                ]
            )
    print_table(
        "Replay of missed events on reconnect (Last-Event-ID), ms to the last byte",
        [
            "missed",
            "ours ms",
            "baseline ms",
            "ratio",
            "ours events",
            "baseline events",
            "ours events/s",
        ],
        rows,
    )


def _log(run: Bench, job_id: str) -> list[tuple[str, dict[str, str]]]:
    redis = run.redis()
    rows: list[tuple[str, dict[str, str]]] = redis.xrange(f"bench:job:{{{job_id}}}:events")
    redis.close()
    assert json.loads(rows[-1][1]["e"])["type"] == "completed"
    return rows


if __name__ == "__main__":
    main()
