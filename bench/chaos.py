"""The chaos soak: a stack under load while its processes are killed, paused and restarted, then
checked against the promises the docs make (docs/reliability.md).

    python -m bench.chaos --seconds 300

It starts a Valkey (append-only file on), ``--webs`` web processes and ``--workers`` arq workers,
keeps a mix of jobs in flight (paced, flaky, failing on purpose, cancelled mid-run, small
batches, delayed; every submit with an ``Idempotency-Key``, retried with the same key on a 503
or a dropped connection), follows their streams with watchers that reconnect to any web process
with their cursor, and injects a fault every few seconds: SIGKILL or SIGTERM of a worker,
SIGKILL of a web process, a Valkey restart, a Valkey pause (SIGSTOP). Then it stops the faults,
lets every job end (bounded), checks the invariants (docs/reliability.md) against what is
stored and what the watchers saw, and prints each violation with the job id and its log.
Exit code 0 only without a violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from arq.constants import in_progress_key_prefix, job_key_prefix
from httpx_sse import EventSource

from bench.common import LIFTED, rss_kib
from stepstream.tasks import transitions
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.store import decode_record
from tests.support import http
from tests.support.processes import Process, Valkey, Web, Worker, stack_env, wait_until
from tests.support.tasks import COUNTED_STEPS, executions_key, gate_key

PREFIX = "chaos:"
TERMINAL = ("completed", "failed", "cancelled")
KINDS = (
    "paced",
    "counted",
    "flaky",
    "failing",
    "cancelled",
    "batch",
    "delayed",
    "waiting",
    "fanout",
)
# The test tasks, and the fan-out ones (a parent mapping ``fan_leaf`` over its inputs).
TASK_MODULES = "tests.support.tasks,tests.support.fanout_tasks"
# The human input the ``asks`` test task waits for (tests/support/tasks.py).
ANSWER = {"name": "decision", "value": {"approved": True, "note": "chaos"}}
# The steps each checkpointed task runs with ``ctx.run_step``: never again once completed.
CHECKPOINTED = {"counted": COUNTED_STEPS, "asks": ("before", "after")}
FAULTS = ("worker_sigkill", "worker_sigterm", "web_sigkill", "valkey_restart", "valkey_pause")
TEXT = "Revenue grew in the north. Churn fell. Hiring slowed in the south. " * 6
RSS_FACTOR, RSS_SLACK_KIB = 1.5, 64 * 1024  # growth flagged beyond 1.5 x baseline + 64 MiB


# -- the run's record ----------------------------------------------------------------------


@dataclass
class Submission:
    key: str
    kind: str
    path: str
    body: dict[str, Any]
    ids: set[str] = field(default_factory=set)  # every id a 200/202 answered with
    accepted: bool = False
    gave_up: str | None = None
    tries: int = 0


@dataclass
class Watch:
    job_id: str
    start_after: str | None  # the cursor the first connect used ("0": the whole log)
    seen: list[str] = field(default_factory=list)
    terminal: bool = False
    reconnects: int = 0
    webs: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


@dataclass
class Run:
    submissions: list[Submission] = field(default_factory=list)
    watches: list[Watch] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    unexpected_exits: list[tuple[str, str]] = field(default_factory=list)  # (name, log tail)
    cancels: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def accepted_ids(self) -> dict[str, Submission]:
        return {i: s for s in self.submissions for i in s.ids}


# -- the stack -----------------------------------------------------------------------------


class Stack:
    """Valkey, the web processes and the workers; every process stopped by ``close``."""

    def __init__(self, log_dir: Path, webs: int, workers: int) -> None:
        self.log_dir = log_dir
        self.valkey = Valkey(log_dir / "valkey")
        self.env = stack_env("", PREFIX, **LIFTED, STEPSTREAM_TASK_MODULES=TASK_MODULES)
        self.web_count, self.worker_count = webs, workers
        self.webs: list[Web] = []
        self.workers: list[Worker] = []
        self.retired: list[Process] = []  # killed on purpose; their logs stay for excerpts
        self.started_rss: dict[str, int] = {}  # a replacement's RSS (KiB) as it started

    def start(self) -> None:
        self.valkey.start()
        self.env["REDIS_URL"] = self.valkey.url
        for _ in range(self.web_count):
            self.webs.append(Web(self.env, self.log_dir).start())
        for _ in range(self.worker_count):
            self.workers.append(Worker(self.env, self.log_dir).start())

    def close(self) -> None:
        for process in [*self.workers, *self.webs]:
            with suppress(Exception):
                process.stop()
        with suppress(Exception):
            if self.valkey.server is not None:
                os.kill(self.valkey.server._process.pid, signal.SIGCONT)
        with suppress(Exception):
            self.valkey.stop()

    def redis(self) -> Any:  # redis.Redis, whose sync methods are typed as maybe awaitable
        return redis.Redis.from_url(self.valkey.url, decode_responses=True, socket_timeout=10)

    def pids(self) -> dict[str, int]:
        found = {p.name: p.proc.pid for p in [*self.webs, *self.workers] if p.proc and p.alive}
        if self.valkey.server is not None:
            found["valkey"] = self.valkey.server._process.pid
        return found

    # faults, each blocking until the stack is whole again

    def worker_sigkill(self) -> str:
        victim = random.choice(self.workers)
        victim.kill()
        return self._replace_worker(victim)

    def worker_sigterm(self) -> str:
        victim = random.choice(self.workers)
        victim.signal(signal.SIGTERM)
        with suppress(Exception):
            assert victim.proc is not None
            victim.proc.wait(timeout=15)  # the grace period (2 s) and the hand-back
        victim.kill()
        return self._replace_worker(victim)

    def _replace_worker(self, victim: Worker) -> str:
        victim.stop()
        self.workers.remove(victim)
        self.retired.append(victim)
        worker = Worker(self.env, self.log_dir).start()
        self.workers.append(worker)
        with suppress(OSError, RuntimeError):
            assert worker.proc is not None
            self.started_rss[worker.name] = rss_kib(worker.proc.pid)
        return victim.name

    def web_sigkill(self) -> str:
        victim = random.choice(self.webs)
        victim.kill()
        victim.stop()
        index = self.webs.index(victim)
        self.retired.append(victim)
        self.webs[index] = self._start_web(victim.port)
        return victim.name

    def _start_web(self, port: int) -> Web:
        deadline = time.monotonic() + 30
        while True:  # the port may linger for a moment after a SIGKILL
            try:
                return Web(self.env, self.log_dir, port=port).start()
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def valkey_restart(self) -> str:
        self.valkey.restart(down_for=random.uniform(0.2, 2.0))
        return "valkey"

    def valkey_pause(self) -> str:
        with self.valkey.paused():
            time.sleep(random.uniform(1.0, 4.0))
        return "valkey"

    def reap(self, run: Run) -> None:
        """A process that exited by itself is a defect: record it, then put it back."""
        for worker in list(self.workers):
            if not worker.alive:
                run.unexpected_exits.append((worker.name, tail(worker.log(), 25)))
                self._replace_worker(worker)
        for index, web in enumerate(list(self.webs)):
            if not web.alive:
                run.unexpected_exits.append((web.name, tail(web.log(), 25)))
                web.stop()
                self.retired.append(web)
                self.webs[index] = self._start_web(web.port)


def tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


# -- load ----------------------------------------------------------------------------------


def new_submission(kind: str) -> Submission:
    key = f"chaos-{uuid.uuid4().hex}"
    body: dict[str, Any]
    if kind == "paced":
        body = {"task": "analyze_document", "input": {"text": TEXT, "pace": 0.15}}
    elif kind == "counted":
        body = {"task": "counted", "input": {}}
    elif kind == "flaky":
        fail_at = random.choice(COUNTED_STEPS)
        body = {"task": "counted", "input": {"transient_failures": 2, "fail_at": fail_at}}
    elif kind == "failing":
        if random.random() < 0.5:
            body = {"task": "counted", "input": {"permanent_failure": True, "fail_at": "two"}}
        else:
            body = {
                "task": "analyze_document",
                "input": {"text": TEXT, "pace": 0.05, "fail_at": "Ranking chunks"},
            }
    elif kind == "cancelled":
        body = {"task": "counted", "input": {"gate_at": "three"}}
    elif kind == "delayed":
        body = {"task": "counted", "input": {}, "delay": round(random.uniform(0.5, 4), 2)}
    elif kind == "fanout":
        # A parent that maps fan_leaf over 3 to 8 inputs, some failing transiently (their
        # retries succeed), collecting: it waits holding no worker, through the faults.
        count = random.randint(3, 8)
        body = {
            "task": "fan_out",
            "input": {"count": count, "pace": 0.05, "on_failure": "collect", "concurrency": 4},
        }
    elif kind == "waiting":
        # Answered by the soak after a moment, or left to a timeout that applies a default (and
        # then, half the time, answered too, racing the timeout).
        body = {"task": "asks", "input": {}}
        if random.random() < 0.4:
            body["input"] = {"timeout": round(random.uniform(1, 3), 2), "default": ANSWER["value"]}
    else:
        size = random.randint(2, 5)
        inputs = [{"transient_failures": random.choice([0, 0, 1])} for _ in range(size)]
        body = {"task": "counted", "inputs": inputs}
        return Submission(key, kind, "/api/batches", body)
    return Submission(key, kind, "/api/jobs", body)


class Load:
    def __init__(self, stack: Stack, run: Run, in_flight: int, watchers: int) -> None:
        self.stack, self.run = stack, run
        self.in_flight, self.watchers = in_flight, watchers
        self.open: set[str] = set()  # accepted ids not yet seen ended by the submitter
        self.stopping = asyncio.Event()
        self.pending: set[asyncio.Task[None]] = set()  # submits and cancels under way
        self.watch_queue: asyncio.Queue[str] = asyncio.Queue()

    def base(self) -> str:
        return random.choice(self.stack.webs).url

    async def submit(self, client: httpx.AsyncClient, sub: Submission) -> None:
        """One submission, retried with the same key on 503, 409 in flight and dropped
        connections, for at most 60 s and 40 tries."""
        deadline = time.monotonic() + 60
        while sub.tries < 40 and time.monotonic() < deadline:
            sub.tries += 1
            try:
                response = await client.post(
                    self.base() + sub.path,
                    json=sub.body,
                    headers={"Idempotency-Key": sub.key},
                    timeout=15,
                )
            except httpx.ConnectError:
                await asyncio.sleep(0.3)
                continue
            except httpx.HTTPError:
                await asyncio.sleep(0.3)
                continue
            if response.status_code in (200, 202):
                job_id = response.json()["id"]
                sub.ids.add(job_id)
                sub.accepted = True
                self.open.add(job_id)
                await self.watch_queue.put(job_id)
                if sub.kind == "cancelled":
                    self.spawn(self.cancel_later(client, job_id))
                if sub.kind == "waiting" and (
                    "timeout" not in sub.body["input"] or random.random() < 0.5
                ):
                    self.spawn(self.answer_later(client, job_id))
                return
            if response.status_code in (503, 409, 429) or response.status_code >= 500:
                retry_after = float(response.headers.get("retry-after", "0.5") or 0.5)
                await asyncio.sleep(min(retry_after, 2.0))
                continue
            sub.gave_up = f"{response.status_code} {response.text[:200]}"
            return
        sub.gave_up = sub.gave_up or f"no answer after {sub.tries} tries"

    async def cancel_later(self, client: httpx.AsyncClient, job_id: str) -> None:
        await asyncio.sleep(random.uniform(0.5, 2.5))
        for _ in range(30):
            try:
                response = await client.post(f"{self.base()}/api/jobs/{job_id}/cancel", timeout=10)
            except httpx.HTTPError:
                await asyncio.sleep(0.5)
                continue
            if response.status_code in (200, 202, 409):
                self.run.cancels.add(job_id)
                return
            await asyncio.sleep(0.5)

    async def answer_later(self, client: httpx.AsyncClient, job_id: str) -> None:
        """Answer once the job waits, to any web process, retried like a submit: a job that
        ended or was answered already (a reply lost, or the timeout's default) is done with."""
        deadline = time.monotonic() + 60
        waited = False
        while time.monotonic() < deadline:
            try:
                if not waited:
                    record = (
                        await client.get(f"{self.base()}/api/jobs/{job_id}", timeout=10)
                    ).json()
                    if record.get("state") in TERMINAL:
                        return
                    if record.get("state") != "waiting":
                        await asyncio.sleep(0.3)
                        continue
                    waited = True
                    await asyncio.sleep(random.uniform(0.2, 1.5))
                response = await client.post(
                    f"{self.base()}/api/jobs/{job_id}/input", json=ANSWER, timeout=10
                )
            except (httpx.HTTPError, ValueError):
                await asyncio.sleep(0.3)
                continue
            if response.status_code in (202, 409):
                return
            await asyncio.sleep(0.5)

    def spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def submitter(self) -> None:
        async with httpx.AsyncClient() as client:
            while not self.stopping.is_set():
                await self.prune(client)
                while len(self.open) + len(self.pending) < self.in_flight:
                    sub = new_submission(random.choice(KINDS))
                    self.run.submissions.append(sub)
                    self.spawn(self.submit(client, sub))
                await asyncio.sleep(0.2)
            if self.pending:
                await asyncio.wait(self.pending, timeout=80)

    async def prune(self, client: httpx.AsyncClient) -> None:
        """Forget the ids that have ended, so the submitter keeps ``in_flight`` going."""
        if not self.open:
            return
        try:
            r = self.stack.redis()
            keys = Keys(PREFIX)
            ids = list(self.open)
            states = await asyncio.to_thread(
                lambda: [r.hget(keys.job(i), "state") for i in ids]  # one round trip each
            )
            r.close()
        except redis.RedisError:
            return
        for job_id, state in zip(ids, states, strict=True):
            if state is not None and json.loads(state) in TERMINAL:
                self.open.discard(job_id)

    async def watcher(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    job_id = await asyncio.wait_for(self.watch_queue.get(), timeout=1.0)
                except TimeoutError:
                    if self.stopping.is_set():
                        return
                    continue
                await self.follow(client, job_id)

    async def follow(self, client: httpx.AsyncClient, job_id: str) -> None:
        """Follow one job's stream to its terminal event across drops and web restarts,
        reconnecting to any web process with the last id seen (bounded: 150 s, 300 tries)."""
        start = "0" if random.random() < 0.5 else None
        watch = Watch(job_id, start)
        self.run.watches.append(watch)
        cursor = start
        deadline = time.monotonic() + 150
        while not watch.terminal and time.monotonic() < deadline and watch.reconnects < 300:
            web = random.choice(self.stack.webs)
            watch.webs.add(web.port)
            url = f"{web.url}/api/jobs/{job_id}/events"
            params = {"after": cursor} if cursor is not None else {}
            # Drop on purpose now and then, as a browser tab on a bad network does.
            drop_after = random.choice([None, None, 2, 5])
            try:
                async with client.stream(
                    "GET", url, params=params, timeout=httpx.Timeout(10, read=20)
                ) as response:
                    if response.status_code == 204:
                        watch.problems.append(f"204 with cursor {cursor} before a terminal event")
                        return
                    if response.status_code != 200:
                        await asyncio.sleep(0.5)
                        watch.reconnects += 1
                        continue
                    count = 0
                    async for event_id, event_type, data in sse_events(response):
                        if event_type == "snapshot":
                            if cursor is None:
                                cursor = event_id
                                watch.start_after = event_id
                                # A job that had ended: the snapshot is all there is.
                                watch.terminal = json.loads(data).get("state") in TERMINAL
                            else:
                                watch.problems.append(f"snapshot on a resume after {cursor}")
                            continue
                        if event_type == "reset":
                            watch.problems.append(f"reset after {cursor}")
                            continue
                        if event_id is None:
                            continue
                        watch.seen.append(event_id)
                        cursor = event_id
                        if event_type in TERMINAL:
                            watch.terminal = True
                            break
                        count += 1
                        if drop_after is not None and count >= drop_after:
                            break
            except httpx.HTTPError:
                await asyncio.sleep(0.3)
            watch.reconnects += 1
        if not watch.terminal:
            watch.problems.append(f"no terminal event after {watch.reconnects} connects")


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str, str]]:
    """(id, event type, data) of each SSE frame with data. A frame without an id (a ``reset``)
    carries the last one, as in a browser; the caller only reads ids of job events."""
    async for sse in EventSource(response).aiter_sse():
        if sse.data:
            yield sse.id or None, sse.event, sse.data


async def inject_faults(
    stack: Stack,
    run: Run,
    stop: asyncio.Event,
    every: tuple[float, float],
    enough: asyncio.Event,
    min_faults: int,
) -> None:
    """Faults until ``stop``; ``enough`` is set once ``min_faults`` are in."""
    if min_faults <= 0:
        enough.set()
    next_at = time.monotonic() + random.uniform(*every)
    deck: list[str] = []  # every kind once, in a random order, then again: a short run sees all
    while not stop.is_set():
        await asyncio.to_thread(stack.reap, run)
        if time.monotonic() >= next_at:
            if not deck:
                deck = random.sample(FAULTS, len(FAULTS))
            kind = deck.pop()
            victim = await asyncio.to_thread(getattr(stack, kind))
            run.faults[kind] += 1
            if sum(run.faults.values()) >= min_faults:
                enough.set()
            print(f"  {time.strftime('%H:%M:%S')} fault {kind} ({victim})", flush=True)
            next_at = time.monotonic() + random.uniform(*every)
        await asyncio.sleep(0.5)


# -- after ---------------------------------------------------------------------------------


def drain(stack: Stack, run: Run, timeout: float) -> None:
    """Release every gate and wait (bounded) for every accepted job to end."""
    r = stack.redis()
    keys = Keys(PREFIX)
    ids = list(run.accepted_ids())
    for job_id in ids:
        r.rpush(gate_key(job_id), "go")  # a cancelled job whose cancel never came

    def answer_the_waiting() -> None:
        # A waiting job whose answer gave up (60 s of faults) is answered here, as a gate is
        # released: the soak checks what happens to jobs, not that a person came back.
        for job_id in ids:
            if r.hget(keys.job(job_id), "state") == '"waiting"':
                with suppress(httpx.HTTPError):
                    http.post(f"{stack.webs[0].url}/api/jobs/{job_id}/input", json=ANSWER)

    def ended() -> bool:
        answer_the_waiting()
        states = [r.hget(keys.job(i), "state") for i in ids]
        return all(s is None or json.loads(s) in TERMINAL for s in states)

    try:
        wait_until(ended, timeout=timeout, interval=1.0, what="every job to end")
    except TimeoutError:
        run.notes.append(f"drain: not every job ended within {timeout:.0f} s")
    r.close()


def excerpt(events: list[tuple[str, dict[str, Any]]], limit: int = 14) -> str:
    lines = []
    for event_id, event in events[-limit:]:
        extra = ""
        if "step" in event and isinstance(event["step"], dict):
            extra = f" step={event['step'].get('name')}"
        if event.get("restored"):
            extra += " restored"
        if "error" in event and isinstance(event["error"], dict):
            extra += f" error={event['error'].get('type')}: {event['error'].get('message')}"
        lines.append(f"      {event_id} {event['type']} attempt={event.get('attempt')}{extra}")
    return "\n".join(lines)


def whereabouts(stack: Stack, job_id: str, lines: int = 12) -> str:
    """What arq holds for a job that never ended, and what the processes logged about it."""
    r = stack.redis()
    keys = Keys(PREFIX)
    score = r.zscore(keys.queue, job_id)
    entry = "none" if score is None else f"due in {(score - time.time() * 1000) / 1000:.1f}s"
    found = [
        f"      arq: queue entry {entry}, "
        f"in-progress key ttl {r.pttl(in_progress_key_prefix + job_id)} ms, "
        f"job key {'present' if r.exists(job_key_prefix + job_id) else 'none'}, "
        f"cancel flag {'set' if r.exists(keys.job_cancel(job_id)) else 'none'}"
    ]
    for path in sorted(stack.log_dir.glob("*.log")):
        text = path.read_text(errors="replace").splitlines()
        hits = [n for n, line in enumerate(text) if job_id in line]
        found += [f"      {path.stem}: {text[n]}" for n in hits[-lines:]]
    return "\n".join(found)


def check(stack: Stack, run: Run) -> dict[str, int]:
    r = stack.redis()
    keys = Keys(PREFIX)
    v = run.violations
    accepted = run.accepted_ids()
    logs: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    records: dict[str, Any] = {}
    all_ids = r.zrange(keys.jobs, 0, -1)
    children_of: dict[str, list[str]] = {}
    for job_id in set(all_ids) | set(accepted):
        raw = r.hgetall(keys.job(job_id))
        records[job_id] = decode_record(raw) if raw else None
        logs[job_id] = [(i, json.loads(f["e"])) for i, f in r.xrange(keys.job_events(job_id))]
        record = records[job_id]
        if record is not None and (record.batch is not None or record.children is not None):
            children_of[job_id] = r.lrange(keys.batch_children(job_id), 0, -1)
    events_total = sum(len(log) for log in logs.values())

    def say(job_id: str, what: str) -> None:
        v.append(f"{job_id}: {what}\n{excerpt(logs.get(job_id, []))}")

    # No accepted submission is missing; a key never maps to two jobs.
    for sub in run.submissions:
        if len(sub.ids) > 1:
            v.append(f"key {sub.key} ({sub.kind}) answered with {len(sub.ids)} jobs: {sub.ids}")
        for job_id in sub.ids:
            if records.get(job_id) is None:
                say(job_id, f"accepted ({sub.kind}, key {sub.key}) but no record")
    known = set(accepted) | {c for cs in children_of.values() for c in cs}
    strays = [i for i in all_ids if i not in known]
    # A submission retried until it gave up may have made its job all the same (its answers
    # lost); every other job must be one an answer named.
    unanswered = [s for s in run.submissions if (s.gave_up or "").startswith("no answer")]
    if strays and not unanswered:
        for job_id in strays:
            say(job_id, "a job no accepted submission answered with (a duplicate?)")
    elif strays:
        run.notes.append(f"{len(strays)} jobs from {len(unanswered)} submits that got no answer")

    rerun_steps = 0
    for job_id, record in records.items():
        if record is None or (job_id not in known):
            continue
        log = logs[job_id]
        types = [e["type"] for _, e in log]
        # Exactly one terminal state; the record agrees with its log.
        terminals = [n for n, t in enumerate(types) if t in TERMINAL]
        if len(terminals) != 1:
            say(job_id, f"{len(terminals)} terminal events (state {record.state.value})")
        elif terminals[0] != len(types) - 1:
            say(job_id, f"events after the terminal {types[terminals[0]]}")
        if record.state.value not in TERMINAL:
            say(job_id, f"never ended: state {record.state.value}\n{whereabouts(stack, job_id)}")
        elif terminals and types[terminals[-1]] != record.state.value:
            say(job_id, f"record says {record.state.value}, log ends {types[terminals[-1]]}")
        if log and record.last_event_id != log[-1][0]:
            say(job_id, f"record's last_event_id {record.last_event_id} is not {log[-1][0]}")
        # Strictly increasing ids.
        ids = [tuple(map(int, i.split("-"))) for i, _ in log]
        if any(b <= a for a, b in itertools.pairwise(ids)):
            say(job_id, "event ids not strictly increasing")
        rerun_steps += check_steps(job_id, record, log, r, say)

    if rerun_steps:
        run.notes.append(
            f"{rerun_steps} completed steps of uncheckpointed tasks (ctx.step) ran again in a "
            "later run (expected: only ctx.run_step is skipped on a re-run)"
        )

    # Every watcher's sequence is a contiguous slice of the log.
    for watch in run.watches:
        log_ids = [i for i, _ in logs.get(watch.job_id, [])]
        for problem in watch.problems:
            say(watch.job_id, f"watcher (webs {sorted(watch.webs)}): {problem}")
        if watch.start_after is None:
            continue
        expected = [i for i in log_ids if watch.start_after == "0" or _after(i, watch.start_after)]
        if watch.seen != expected[: len(watch.seen)]:
            dup = len(watch.seen) != len(set(watch.seen))
            say(
                watch.job_id,
                f"watcher from {watch.start_after} saw {len(watch.seen)} events that are not "
                f"the log's {'(duplicates)' if dup else '(a gap or reorder)'}: "
                f"first difference at {_first_difference(watch.seen, expected)}",
            )

    # A job's children (ctx.map): none orphaned, none twice, and the parent's result is theirs
    # in input order.
    for job_id, record in records.items():
        if record is None or record.parent is None:
            continue
        parent = records.get(record.parent)
        if parent is None:
            say(job_id, f"orphaned: its parent {record.parent} has no record")
        elif parent.state.value in TERMINAL and record.state.value not in TERMINAL:
            say(job_id, f"orphaned: {record.state.value}, its parent {parent.state.value}")
    for parent_id, children in children_of.items():
        parent = records[parent_id]
        if parent_id not in known or parent is None or parent.children is None:
            continue
        if len(children) != len(set(children)) or len(children) != parent.input.get("count"):
            say(parent_id, f"{len(children)} children for {parent.input.get('count')} inputs")
        if parent.state.value != "completed":
            continue
        kids = sorted(
            (c for c in (records.get(i) for i in children) if c is not None),
            key=lambda c: c.parent_index or 0,
        )
        truth = [
            c.result["square"] if c.state.value == "completed" and c.result else None for c in kids
        ]
        if parent.result.get("squares") != truth:
            say(parent_id, f"result {parent.result.get('squares')}, children's {truth}")

    # Batch counts equal their children's states.
    for parent_id, children in children_of.items():
        if parent_id not in known:
            continue
        parent = records[parent_id]
        if parent is None or parent.batch is None:
            continue
        states = Counter(
            record.state.value if (record := records.get(c)) is not None else "missing"
            for c in children
        )
        counts = parent.batch or {}
        truth = {k: states.get(k, 0) for k in TERMINAL}
        truth["done"] = sum(truth.values())
        stored = {k: int(counts.get(k, 0)) for k in truth}
        if stored != truth:
            say(parent_id, f"batch counts {stored}, children {dict(states)}")

    # Every transition counter equals the transitions in the logs (tasks/transitions.py): the
    # append script counts what it writes, whatever was killed around it.
    from_logs: Counter[tuple[str, str]] = Counter()
    for job_id in all_ids:
        record = records.get(job_id)
        if record is None:
            continue
        types = [e["type"] for _, e in logs[job_id]]
        from_logs["submitted", record.task] += 1
        for name, event in transitions.EVENT_TYPES.items():
            if name != "submitted":
                from_logs[name, record.task] += types.count(event)
    counted: Counter[tuple[str, str]] = Counter()
    for name in transitions.COUNTERS:
        for task, n in r.hgetall(keys.transitions(name)).items():
            counted[name, task] = int(n)
    for name, task in sorted(set(from_logs) | set(counted)):
        if from_logs[name, task] != counted[name, task]:
            v.append(
                f"{name} of {task}: counted {counted[name, task]}, "
                f"the logs have {from_logs[name, task]}"
            )

    # The owner's unfinished set is exactly the non-terminal records.
    unfinished = set(r.zrange(keys.owner_unfinished(None), 0, -1))
    open_records = {
        i for i, rec in records.items() if rec is not None and rec.state.value not in TERMINAL
    }
    # A batch's parent holds no place (a job waiting for its children does).
    open_records -= {i for i in children_of if (rec := records[i]) is not None and rec.batch}
    if unfinished != open_records:
        extra, missing = unfinished - open_records, open_records - unfinished
        v.append(
            f"owner's unfinished set drifted: {len(unfinished)} held vs {len(open_records)} "
            f"open; held but ended {sorted(extra)[:5]}, open but not held {sorted(missing)[:5]}"
        )
    r.close()
    inputs = Counter(
        event.get("by") for log in logs.values() for _, event in log if event["type"] == "input"
    )
    waits = sum(1 for log in logs.values() for _, event in log if event["type"] == "waiting")
    return {
        "jobs": len(known & set(records)),
        "events": events_total,
        "waits": waits,
        "answers": sum(inputs.values()) - inputs["default"],
        "defaults": inputs["default"],
    }


def check_steps(
    job_id: str, record: Any, log: list[tuple[str, dict[str, Any]]], r: Any, say: Any
) -> int:
    """No step completes twice within one run (the events between two ``started``); for the
    checkpointed tasks (``counted``, and ``asks``, which waits for input between its steps and
    so runs from the top again after the answer), a completed step never runs again, and every
    execution of a step's body follows a stored ``step`` event (so executions <= begins)."""
    run_index = 0
    per_run: Counter[tuple[int, str]] = Counter()
    begins: Counter[str] = Counter()
    fresh_completions: Counter[str] = Counter()
    completed_once: set[str] = set()
    for _, event in log:
        kind = event["type"]
        if kind == "started":
            run_index += 1
        step = event.get("step", {}).get("name") if isinstance(event.get("step"), dict) else None
        if kind == "step" and step:
            begins[step] += 1
            if step in completed_once and step in CHECKPOINTED.get(record.task, ()):
                say(job_id, f"checkpointed step {step!r} began again after it completed")
        if kind == "step_completed" and step:
            per_run[(run_index, step)] += 1
            if per_run[(run_index, step)] == 2:
                say(job_id, f"step {step!r} completed twice in run {run_index}")
            if not event.get("restored"):
                fresh_completions[step] += 1
                completed_once.add(step)
    checkpointed = CHECKPOINTED.get(record.task)
    if checkpointed is None:
        # ``async with ctx.step()`` is not checkpointed: a re-run does the step again. Counted,
        # not a violation (docs/reliability.md).
        return sum(n - 1 for n in fresh_completions.values() if n > 1)
    executions = {k: int(n) for k, n in r.hgetall(executions_key(job_id)).items()}
    for step in checkpointed:
        if fresh_completions[step] > 1:
            say(job_id, f"checkpointed step {step!r} ran to completion {fresh_completions[step]}x")
        if executions.get(step, 0) > begins[step]:
            say(
                job_id,
                f"step {step!r} executed {executions[step]}x but began {begins[step]}x in the log",
            )
    return 0


def _after(a: str, b: str) -> bool:
    return tuple(map(int, a.split("-"))) > tuple(map(int, b.split("-")))


def _first_difference(seen: list[str], expected: list[str]) -> str:
    for n, (a, b) in enumerate(zip(seen, expected, strict=False)):
        if a != b:
            return f"#{n}: saw {a}, log has {b}"
    return f"#{min(len(seen), len(expected))}: saw {len(seen)}, log has {len(expected)}"


def measure_rss(stack: Stack) -> dict[str, int]:
    found = {}
    for name, pid in stack.pids().items():
        with suppress(OSError, RuntimeError):
            found[name] = rss_kib(pid)
    return found


# -- main ----------------------------------------------------------------------------------


async def soak(stack: Stack, run: Run, args: argparse.Namespace) -> dict[str, int]:
    load = Load(stack, run, args.in_flight, args.watchers)
    stop_faults = asyncio.Event()
    submitter = asyncio.create_task(load.submitter())
    watchers = [asyncio.create_task(load.watcher()) for _ in range(args.watchers)]
    await asyncio.sleep(min(10.0, args.seconds / 6))
    baseline = measure_rss(stack)  # warm: the stack has run jobs for a while
    print(f"  baseline RSS (MiB): {fmt_rss(baseline)}", flush=True)
    enough = asyncio.Event()
    faults = asyncio.create_task(
        inject_faults(
            stack, run, stop_faults, (args.fault_min, args.fault_max), enough, args.min_faults
        )
    )
    try:
        await asyncio.sleep(args.seconds)
        # A loaded machine makes each fault slower (a replacement starts slower, a SIGTERM
        # waits out its worker's jobs): go on until the run has injected what it was asked to.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), timeout=2 * args.seconds)
    finally:
        stop_faults.set()
        await asyncio.wait_for(faults, timeout=60)
        load.stopping.set()
        print("  faults stopped; waiting for the jobs to end", flush=True)
        await asyncio.wait_for(submitter, timeout=90)
    await asyncio.to_thread(stack.reap, run)
    await asyncio.to_thread(drain, stack, run, args.drain)
    _, still = await asyncio.wait(watchers, timeout=60)
    for task in still:
        task.cancel()
    await asyncio.sleep(3)  # let the processes settle before the last figures
    return baseline


def fmt_rss(figures: dict[str, int]) -> str:
    return ", ".join(f"{n} {kib / 1024:.0f}" for n, kib in sorted(figures.items()))


def check_rss(stack: Stack, run: Run, baseline: dict[str, int]) -> None:
    after = measure_rss(stack)
    print("\nRSS (MiB), baseline -> after the soak (a replaced worker's baseline: at its start)")
    for name in sorted(after):
        before = baseline.get(name, stack.started_rss.get(name))
        shown = "-" if before is None else f"{before / 1024:.0f}"
        line = f"  {name:14} {shown:>6} -> {after[name] / 1024:6.0f}"
        if before is not None and after[name] > before * RSS_FACTOR + RSS_SLACK_KIB:
            run.violations.append(
                f"{name}: RSS {before / 1024:.0f} MiB -> {after[name] / 1024:.0f} MiB"
            )
            line += "  <- grew"
        print(line)


@contextmanager
def log_dir(keep: bool, run: Run) -> Iterator[Path]:
    """The processes' logs: kept when asked, or when the soak found a violation."""
    path = Path(tempfile.mkdtemp(prefix="stepstream-chaos-"))
    try:
        yield path
    finally:
        if keep or run.violations:
            print(f"logs kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=300, help="how long faults are injected")
    parser.add_argument("--webs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=24, help="jobs kept in flight")
    parser.add_argument("--watchers", type=int, default=10)
    parser.add_argument(
        "--fault-min", type=float, default=3.0, help="seconds between faults, least"
    )
    parser.add_argument("--fault-max", type=float, default=7.0, help="seconds between faults, most")
    parser.add_argument(
        "--min-faults",
        type=int,
        default=0,
        help="go on past --seconds until this many faults are in (3 x --seconds at most)",
    )
    parser.add_argument("--drain", type=float, default=120, help="longest wait for jobs to end")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    random.seed(seed)
    run = Run()
    figures = {"jobs": 0, "events": 0}
    started = time.monotonic()
    print(
        f"chaos soak: {args.seconds:.0f} s, {args.webs} webs, {args.workers} workers, "
        f"{args.in_flight} jobs in flight, {args.watchers} watchers, seed {seed}",
        flush=True,
    )
    with log_dir(args.keep_logs, run) as logs:
        stack = Stack(logs, args.webs, args.workers)
        try:
            stack.start()
            baseline = asyncio.run(soak(stack, run, args))
            figures = check(stack, run)
            check_rss(stack, run, baseline)
            for name, log_tail in run.unexpected_exits:
                run.violations.append(f"{name} exited by itself; its log ends:\n{log_tail}")
        except KeyboardInterrupt:
            print("interrupted: stopping every process", file=sys.stderr)
            return 130
        finally:
            stack.close()
        report(run, figures, seed, time.monotonic() - started)
    return 1 if run.violations else 0


def by_kind(counts: Counter[str]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))


def report(run: Run, figures: dict[str, int], seed: int, elapsed: float) -> None:
    subs = run.submissions
    kinds = Counter(s.kind for s in subs if s.accepted)
    gave_up = [s for s in subs if not s.accepted]
    reconnects = sum(w.reconnects for w in run.watches)
    print("\n== violations ==" if run.violations else "")
    for n, violation in enumerate(run.violations, 1):
        print(f"[{n}] {violation}")
    for note in run.notes:
        print(f"note: {note}")
    print("\n== summary ==")
    print(f"seed {seed}, {elapsed:.0f} s in all")
    print(f"faults injected: {sum(run.faults.values())} ({by_kind(run.faults)})")
    print(f"unexpected process exits: {len(run.unexpected_exits)}")
    print(
        f"submissions: {len(subs)}, accepted {sum(kinds.values())} ({by_kind(kinds)}), "
        f"not accepted {len(gave_up)}"
    )
    for sub in gave_up[:5]:
        print(f"  not accepted: {sub.kind} key {sub.key}: {sub.gave_up}")
    print(f"jobs checked: {figures['jobs']}, events: {figures['events']}")
    print(
        f"human input: {figures.get('waits', 0)} waits, {figures.get('answers', 0)} answered, "
        f"{figures.get('defaults', 0)} ended by a timeout's default"
    )
    print(f"watchers: {len(run.watches)} streams followed, {reconnects} connects")
    print(f"violations: {len(run.violations)}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
