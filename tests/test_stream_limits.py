"""Stream limits: one key's app serves its viewers through tokens; a key, a token and the
process each have their own limit, refused with 429 and Retry-After (production mode)."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.processes import Web, wait_until
from tests.support.sse import StreamReader
from tests.support.tasks import gate_key
from tests.test_auth import ALICE, PRODUCTION, submit_as

VIEWERS = 1_000
PROGRESS_EVENTS = 20


def raise_fd_limit(needed: int) -> None:
    """Each viewer holds a socket here and one in the web process (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.fail(f"this test needs {needed} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def mint_tokens(s: Stack, job_id: str, count: int) -> list[str]:
    """One token per viewer, as an app's backend hands them out."""
    limit = asyncio.Semaphore(50)

    async def mint(client: httpx.AsyncClient) -> str:
        async with limit:
            response = await client.post(f"/api/jobs/{job_id}/token", headers=ALICE)
        assert response.status_code == 200, response.text
        token: str = response.json()["token"]
        return token

    async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
        return list(await asyncio.gather(*(mint(client) for _ in range(count))))


async def watch_all(s: Stack, job_id: str, tokens: list[str]) -> list[tuple[int, list[Any]]]:
    """Every viewer reads the job's whole log (``?after=0``) to its end. Once every one of them
    has connected and read the backlog, the job is released: the rest arrives live."""
    connected = 0
    all_connected = asyncio.Event()
    refused: list[int] = []

    async def watch(client: httpx.AsyncClient, token: str) -> tuple[int, list[Any]]:
        nonlocal connected
        url = f"/api/jobs/{job_id}/events?after=0&token={token}"
        events: list[tuple[str | None, str]] = []
        async with aconnect_sse(client, "GET", url) as source:
            status = source.response.status_code
            if status != 200:
                refused.append(status)
                all_connected.set()  # the test fails on it at once, naming the refusals
                return status, events
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue  # the `retry:` frame
                events.append((sse.id or None, sse.event))
                if len(events) == 1:
                    connected += 1
                    if connected == len(tokens):
                        all_connected.set()
        return status, events

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=s.url, limits=limits, timeout=60) as client:
        tasks = [asyncio.create_task(watch(client, token)) for token in tokens]
        try:
            # A thousand connects and replays from one client process: on a loaded machine (two
            # suites at once) that took over 60 s; the wait is for the condition, not a speed.
            await asyncio.wait_for(all_connected.wait(), 180)
            assert not refused, f"{len(refused)} viewers refused: {sorted(set(refused))}"
            assert connected == len(tokens)
            redis = s.redis()
            for _ in range(PROGRESS_EVENTS):  # paced: one progress event every 20 ms
                redis.rpush(gate_key(job_id), "go")
                await asyncio.sleep(0.02)
            return list(await asyncio.wait_for(asyncio.gather(*tasks), 60))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.slow  # a thousand streams
def test_one_key_s_app_serves_a_thousand_token_viewers_on_one_web_process(
    make_stack: StackFactory,
) -> None:
    raise_fd_limit(2 * VIEWERS + 1_000)
    # A thousand connects at once on a loaded machine can outlast the 5 s request deadline, whose
    # 503 is not what this test is about: the per-key limit's 429 is.
    s = make_stack(webs=1, workers=1, STEPSTREAM_REQUEST_DEADLINE_SECONDS="60", **PRODUCTION)
    job = submit_as(s, ALICE, {"events": PROGRESS_EVENTS}, task="gated")
    assert job["owner"] == "alice"
    wait_until(
        lambda: (
            http.get(f"{s.url}/api/jobs/{job['id']}", headers=ALICE).json()["state"] == "running"
        ),
        timeout=20,
        what="the job to start",
    )
    tokens = asyncio.run(mint_tokens(s, job["id"], VIEWERS))
    assert len(set(tokens)) == VIEWERS

    results = asyncio.run(watch_all(s, job["id"], tokens))

    log = s.redis().xrange(f"{s.prefix}job:{{{job['id']}}}:events")
    expected = [entry_id for entry_id, _ in log]
    assert len(expected) >= PROGRESS_EVENTS + 4  # queued, started, step, progress…, completed
    assert len(results) == VIEWERS
    for status, events in results:
        assert status == 200
        assert [event_id for event_id, _ in events] == expected, "a viewer missed an event"
        assert events[-1][1] == "completed"
    # The streams ended with the job: the web process holds none of them now.
    record = http.get(f"{s.url}/api/jobs/{job['id']}", headers=ALICE).json()
    assert record["state"] == "completed" and record["result"] == {"events": PROGRESS_EVENTS}


def try_stream(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """Ask for a stream and let go of it at once: the answer, with its body unless a stream."""
    with http.stream("GET", url, headers=headers, timeout=10) as response:
        if response.status_code != 200:
            response.read()
    return response


def assert_too_many_streams(response: httpx.Response, per: str, setting: str) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert error["code"] == "too_many_streams"
    assert error["details"]["per"] == per and error["details"]["setting"] == setting
    assert setting in error["message"]


def test_a_key_a_token_and_the_process_each_have_their_own_stream_limit(
    make_stack: StackFactory,
) -> None:
    s = make_stack(
        webs=1,
        workers=0,  # the jobs stay queued, so their streams stay open
        STEPSTREAM_MAX_STREAMS_PER_KEY="2",
        STEPSTREAM_MAX_STREAMS_PER_TOKEN="2",
        STEPSTREAM_MAX_STREAMS="6",
        **PRODUCTION,
    )
    job = submit_as(s, ALICE)
    url = f"{s.url}/api/jobs/{job['id']}/events"
    readers: list[StreamReader] = []

    def open_reader(headers: dict[str, str] | None = None, token: str | None = None) -> None:
        reader = StreamReader(url + (f"?token={token}" if token else ""), headers).start()
        reader.wait_for(lambda events: len(events) >= 1)  # its snapshot: it is open
        readers.append(reader)

    def mint() -> str:
        response = http.post(f"{url.removesuffix('/events')}/token", headers=ALICE)
        assert response.status_code == 200
        token: str = response.json()["token"]
        return token

    try:
        # A HEAD runs no stream and holds no slot once answered.
        for _ in range(3):
            assert http.head(url, headers=ALICE).status_code == 200

        # The key itself: two streams, then 429 (the firehose counts as one of the key's).
        open_reader(ALICE)
        open_reader(ALICE)
        key_limit = ("key", "STEPSTREAM_MAX_STREAMS_PER_KEY")
        assert_too_many_streams(try_stream(url, ALICE), *key_limit)
        assert_too_many_streams(try_stream(f"{s.url}/api/events", ALICE), *key_limit)

        # Tokens the key minted do not count against it; each token has its own limit.
        first, second = mint(), mint()
        open_reader(token=first)
        open_reader(token=first)
        token_limit = ("token", "STEPSTREAM_MAX_STREAMS_PER_TOKEN")
        assert_too_many_streams(try_stream(f"{url}?token={first}"), *token_limit)
        open_reader(token=second)
        open_reader(token=second)

        # Six streams are open: the process takes no seventh, whoever asks.
        process_limit = ("process", "STEPSTREAM_MAX_STREAMS")
        assert_too_many_streams(try_stream(f"{url}?token={mint()}"), *process_limit)

        # Operators see which limit refused how many.
        metrics = http.get(f"{s.url}/metrics").text
        for per, count in [("key", 2), ("token", 1), ("process", 1)]:
            assert f'stepstream_sse_streams_refused_total{{per="{per}"}} {count}.0' in metrics

        # Streams that end give their slots back: the cancel ends all six.
        cancelled = http.post(f"{s.url}/api/jobs/{job['id']}/cancel", headers=ALICE)
        assert cancelled.status_code == 200
        wait_until(
            lambda: http.get(url, headers=ALICE, params={"after": "0"}).status_code == 200,
            timeout=10,
            what="the closed streams to give their slots back",
        )
    finally:
        for reader in readers:
            reader.close()


def max_open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs /proc")
def test_a_web_process_lifts_its_file_limit_to_hold_its_streams(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    """With the soft limit at 512 (a common default is 1,024), streams past it would fail at
    `accept`, before any 429; the web process raises it up to the hard limit, or says why not."""
    s = make_stack(webs=0, workers=0, STEPSTREAM_MAX_STREAMS="4000")
    production = {
        "STEPSTREAM_MODE": "production",
        "STEPSTREAM_SECRET": "s3cret-for-tests-only-0123456789abcdef",
        "STEPSTREAM_API_KEYS": "ops:key-ops-0123456789",
    }
    # The warning is for production only: development's few streams fit any limit.
    for ulimit, env, lifted, warned in [
        ("ulimit -Sn 512", production, True, False),
        ("ulimit -n 512", {}, False, False),
        ("ulimit -n 512", production, False, True),
    ]:
        web = Web({**s.env, **env}, tmp_path)
        web.args = ["sh", "-c", f'{ulimit} && exec "$@"', "sh", *web.args]
        web.start()
        try:
            assert web.proc is not None
            soft, hard = max_open_files(web.proc.pid)
            if lifted:
                assert soft >= 4000 and hard > 512
            else:
                assert (soft, hard) == (512, 512)
            said = web.log().count("may open 512 files but STEPSTREAM_MAX_STREAMS is 4000")
            assert said == (1 if warned else 0), web.log()
            if not warned:
                assert "STEPSTREAM_MAX_STREAMS" not in web.log()
        finally:
            web.stop()
