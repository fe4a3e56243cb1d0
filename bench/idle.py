"""Web processes that work for their own viewers: CPU per event of the deployment.

One Valkey, a storm of ``--events`` events from a writer in this process (the real append,
``JobStore.append_many``, ``--batch`` events of one job per call, spread over ``--jobs`` jobs, at
``--rate`` events/s), and three listeners whose CPU is read from ``/proc`` before and after:

- **idle web**: a web process with no clients. It holds no job's channel and not the firehose's,
  so it hears nothing.
- **one viewer**: a web process with one client watching one of the jobs: it hears that job's
  events only (``events / jobs``) and sends them.
- **one channel (before)**: what every web process did for every event while all of them went
  through one channel: a listener on the firehose channel (which still carries every event)
  that reads each message and builds its two frames as the hub did, with no client at all.
  This is also what a web process pays per event while a firehose viewer is connected, before
  writing to that viewer.

CPU is each process's on-CPU time from ``/proc/PID/task/*/schedstat`` (nanoseconds; utime and
stime in ``/proc/PID/stat`` count 10 ms ticks, too coarse for a fraction of a microsecond per
event), from just before the storm until every listener has heard its last event. "At rest" is
the same measure over ``events / rate`` seconds with no event before the storm; "less rest"
takes that rate (timers, the event loop) out of the storm's figure.

    .venv/bin/python -m bench.idle [--events 32000] [--jobs 100] [--rate 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.common import PREFIX, Bench, bench, fmt, machine, print_table
from bench.throughput import make_jobs, progress_event
from stepstream.server.sse import firehose_data, frame
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.models import JobState, parse_stream_id
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore
from tests.support.processes import ROOT, Web, wait_until


def cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of a process so far, in nanoseconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total


# -- the one-channel listener (the reference) ------------------------------------------------


def old_parse(payload: str) -> tuple[bytes, bytes]:
    """The hub's per-event work when every event came on one channel: parse, two frames."""
    message: dict[str, Any] = json.loads(payload)
    event: dict[str, Any] = message["event"]
    type_: str = event["type"]
    job_event_id: str = message["job_event_id"]
    firehose_id: str = message["firehose_id"]
    parse_stream_id(job_event_id)
    parse_stream_id(firehose_id)
    event_json = payload[payload.index(',"event":') + 9 : -1]
    return (
        frame(type_, event_json, job_event_id),
        frame(type_, firehose_data(event_json, job_event_id), firehose_id),
    )


async def one_channel_listener(url: str, prefix: str, expected: int) -> None:
    """Subscribe to the firehose channel, parse every message as the hub did, and say on stdout
    when subscribed and when ``expected`` messages have been heard."""
    redis = Redis.from_url(url, decode_responses=True)
    pubsub = redis.pubsub()
    # Sharded, as the append script publishes (redis-py 5's asyncio PubSub has no ssubscribe).
    await pubsub.execute_command("SSUBSCRIBE", Keys(prefix).firehose_channel)
    heard = 0
    while True:
        message = await pubsub.get_message(timeout=None)
        if message is None:
            continue
        if message["type"] == "ssubscribe":
            print("subscribed", flush=True)
            continue
        batch = [message["data"]]
        while len(batch) < 100:  # the hub's batching, as it was
            more = await pubsub.get_message(timeout=0)
            if more is None:
                break
            if more["type"] == "smessage":
                batch.append(more["data"])
        for payload in batch:
            old_parse(payload)
        heard += len(batch)
        if heard >= expected:
            print("done", flush=True)
            expected = sys.maxsize


class OneChannelListener:
    def __init__(self, url: str, expected: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.idle", "--listen", url, "--expected", str(expected)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # subscribed
        self.done = threading.Event()
        threading.Thread(target=self._wait_done, daemon=True).start()

    def _wait_done(self) -> None:
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() == "done":
            self.done.set()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class BeforeWeb(Web):
    """A web process of another checkout (``--before``): its code, this run's environment."""

    def __init__(self, checkout: Path, env: dict[str, str], log_dir: Path) -> None:
        super().__init__({**env, "PYTHONPATH": str(checkout)}, log_dir)
        self.checkout = checkout
        self.name = f"before-{self.port}"
        self.log_path = log_dir / f"{self.name}.log"

    def launch(self) -> BeforeWeb:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # ``python -m`` puts the working directory first on sys.path: the checkout's package.
        self.proc = subprocess.Popen(
            self.args, cwd=self.checkout, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self


# -- the one viewer ----------------------------------------------------------------------------


class Viewer:
    """One client of one job's stream: reads raw bytes and counts the progress frames."""

    def __init__(self, port: int, job_id: str) -> None:
        self.frames = 0
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(
            f"GET /api/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        self.opened = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        marker = b"event: progress\n"
        carry = b""
        try:
            while chunk := self.sock.recv(65536):
                data = carry + chunk
                if b"event: snapshot" in data:
                    self.opened.set()
                self.frames += data.count(marker)
                carry = data[-(len(marker) - 1) :]
        except OSError:
            return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


# -- the storm ---------------------------------------------------------------------------------


async def storm(
    url: str,
    ids: list[str],
    events: int,
    batch: int,
    rate: float,
    writers: int,
    cluster_url: str = "",
) -> float:
    """Append ``events`` events (``batch`` per call, job after job) at ``rate`` from ``writers``
    coroutines, to the store at ``url`` (its logs on ``cluster_url`` if given); the seconds it
    took."""
    store = JobStore.open(Settings(redis_url=url, cluster_url=cluster_url, prefix=PREFIX))
    calls = iter(range(events // batch))
    start = time.perf_counter()

    async def writer() -> None:
        for call in calls:
            delay = start + call * batch / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            job_id = ids[call % len(ids)]
            pairs = [progress_event(job_id, call * batch + i) for i in range(batch)]
            appended = await store.append_many(
                job_id, [e for e, _ in pairs], pairs[-1][1], expect=(JobState.running,)
            )
            assert appended.ok, appended

    try:
        await asyncio.gather(*(writer() for _ in range(writers)))
        return time.perf_counter() - start
    finally:
        await store.aclose()


async def jobs(url: str, count: int, cluster_url: str = "") -> list[str]:
    store = JobStore.open(Settings(redis_url=url, cluster_url=cluster_url, prefix=PREFIX))
    try:
        return await make_jobs(store, count)
    finally:
        await store.aclose()


def run_once(
    run: Bench, events: int, job_count: int, batch: int, rate: float, before: Path | None
) -> None:
    events -= events % batch
    idle = run.web()
    watched = run.web()
    pids: dict[str, int] = {}
    if before is not None:
        old = BeforeWeb(before, run.env(), run.log_dir)
        run.processes.append(old)
        old.start()
        pids[f"web of {before} (no clients)"] = old.proc.pid  # type: ignore[union-attr]
    ids = asyncio.run(jobs(run.valkey.url, job_count))
    viewer = Viewer(watched.port, ids[0])
    one_channel = OneChannelListener(run.valkey.url, events)
    try:
        if not viewer.opened.wait(10):
            raise RuntimeError("the viewer's stream did not open")
        pids["idle web (no clients)"] = idle.proc.pid  # type: ignore[union-attr]
        pids["web with one viewer of one job"] = watched.proc.pid  # type: ignore[union-attr]
        pids["one channel (before): every event heard"] = one_channel.proc.pid
        # The same time with no event: what each spends anyway (timers, the event loop).
        quiet = time.perf_counter()
        rest = {name: cpu_ns(pid) for name, pid in pids.items()}
        time.sleep(events / rate)
        rest = {name: cpu_ns(pid) - rest[name] for name, pid in pids.items()}
        quiet = time.perf_counter() - quiet
        before = {name: cpu_ns(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        seconds = asyncio.run(storm(run.valkey.url, ids, events, batch, rate, writers=8))
        per_job = events // batch // job_count * batch
        wait_until(lambda: one_channel.done.is_set(), timeout=60, what="the listener heard all")
        wait_until(lambda: viewer.frames >= per_job, timeout=60, what="the viewer got its job's")
        after = {name: cpu_ns(pid) for name, pid in pids.items()}
        measured = time.perf_counter() - started
    finally:
        viewer.close()
        one_channel.stop()
    print(
        f"\n{events:,} events in {seconds:.2f} s ({events / seconds:,.0f}/s), {job_count} jobs, "
        f"{batch} per append_many call; the viewer got {viewer.frames:,} of its job's events"
    )
    print(f"measured over {measured:.2f} s; at rest over {quiet:.2f} s before the storm")
    rows = []
    for name in pids:
        spent = (after[name] - before[name]) / 1e9
        # Less what it would have spent in that time with no event (its timers).
        net = spent - rest[name] / 1e9 / quiet * measured
        rows.append(
            [
                name,
                fmt(rest[name] / 1e6, 1),
                fmt(spent * 1000, 1),
                fmt(spent / events * 1e6, 3),
                fmt(net / events * 1e6, 3),
            ]
        )
    print_table(
        "CPU per event of the deployment",
        ["listener", "CPU at rest (ms)", "CPU, storm (ms)", "µs per event", "less rest"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    parser.add_argument("--events", type=int, default=32_000)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--batch", type=int, default=10, help="events per append_many call")
    parser.add_argument("--rate", type=float, default=20_000, help="events per second")
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of the code before per-job channels: one of its web processes, with "
        "no clients, is measured too (its hub hears every event on the firehose channel)",
    )
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--listen", help=argparse.SUPPRESS)  # the one-channel listener's process
    parser.add_argument("--expected", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.listen:
        asyncio.run(one_channel_listener(args.listen, PREFIX, args.expected))
        return
    print(f"# bench.idle — {machine()}")
    with bench(args.keep_logs) as run:
        run_once(run, args.events, args.jobs, args.batch, args.rate, args.before)


if __name__ == "__main__":
    main()
