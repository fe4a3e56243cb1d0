"""The soak's load: a mix of jobs kept in flight (every submit with an ``Idempotency-Key``,
retried with the same key), cancels and answers sent to any web process, watchers that follow each
job's stream across drops and web restarts, and the drain that lets every job end."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import httpx
import redis
from httpx_sse import EventSource
from redis.exceptions import RedisClusterException

from bench.chaos.record import TERMINAL, Run, Submission, Watch
from bench.chaos.stack import Stack
from tests.support import http
from tests.support.processes import wait_until
from tests.support.tasks import COUNTED_STEPS, gate_key

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
# The human input the ``asks`` test task waits for (tests/support/tasks.py).
ANSWER = {"name": "decision", "value": {"approved": True, "note": "chaos"}}
TEXT = "Revenue grew in the north. Churn fell. Hiring slowed in the south. " * 6


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
        keys = self.stack.keys
        ids = list(self.open)

        def read_states() -> list[str | None]:
            r = self.stack.redis()
            try:
                pipe = r.pipeline(transaction=False)
                for job_id in ids:
                    pipe.hget(keys.job(job_id), "state")
                return list(pipe.execute())
            finally:
                r.close()

        try:
            states = await asyncio.to_thread(read_states)
        except (redis.RedisError, RedisClusterException):  # a primary killed meanwhile
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


def drain(stack: Stack, run: Run, timeout: float) -> None:
    """Release every gate and wait (bounded) for every accepted job to end."""
    r = stack.redis()
    keys = stack.keys
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
