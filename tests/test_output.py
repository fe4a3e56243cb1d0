"""Streamed step text (``output`` events) against a real web process, worker and Valkey: the
deltas add up to the final text from any cursor, a fresh connect continues the snapshot's text,
and a worker killed mid-stream shows its restart."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from stepstream.tasks.llm import OpenAIProvider
from tests.conftest import Stack, StackFactory
from tests.support.api import DOC, get_job, submit, wait_state
from tests.support.chat_server import Answer, ChatServer, chat_server
from tests.support.cli import LiveCli
from tests.support.output_tasks import streamed_text
from tests.support.sse import Event, StreamReader, read_stream

OUTPUT_TASKS = "tests.support.tasks,tests.support.output_tasks"


@pytest.fixture(scope="module")
def out_stack(module_stacks: StackFactory) -> Stack:
    return module_stacks(
        STEPSTREAM_TASK_MODULES=OUTPUT_TASKS, STEPSTREAM_LLM_OFFLINE_WORD_SECONDS="0.005"
    )


def events_url(base: str, job_id: str) -> str:
    return f"{base}/api/jobs/{job_id}/events"


def outputs(events: list[Event]) -> list[Event]:
    return [e for e in events if e.type == "output"]


def assemble(events: list[Event], text: str = "", attempt: int | None = None) -> str:
    """What a client shows, built as the browser client builds it, strictly: each delta must
    continue the text at its offset, or (offset 0 of another attempt) start it over."""
    for event in outputs(events):
        data = event.data
        assert data["step"]["name"] == "write", data
        if data["offset"] == 0 and attempt is not None and data["attempt"] != attempt:
            text = ""  # a new attempt streams the step again
        assert data["offset"] == len(text), (data["offset"], len(text), data["attempt"])
        text += data["text"]
        attempt = data["attempt"]
    return text


def shown(events: list[Event]) -> str:
    """The text a fresh connect shows: the snapshot's, continued by the deltas after it."""
    assert events and events[0].type == "snapshot"
    steps = events[0].data["steps"]  # none yet in the snapshot of a job not yet started
    return assemble(events[1:], (steps[1]["text"] if steps else None) or "")


def test_the_deltas_add_up_to_the_final_text_in_few_events(out_stack: Stack) -> None:
    job = submit(out_stack.url, "streamer", {"words": 400, "word_seconds": 0.005})
    done = wait_state(out_stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    status, log = read_stream(events_url(out_stack.url, job["id"]) + "?after=0")
    assert status == 200
    final = streamed_text(400)
    assert assemble(log) == final == done["result"]["text"]
    assert done["steps"][1]["text"] == final, "the record keeps the step's whole text"
    assert done["steps"][0]["text"] is None and done["steps"][2]["text"] is None
    deltas = outputs(log)
    # 400 writes over ~2 s (more with the event loop's own latency), at most one event per
    # 50 ms: coalesced into tens of events, not one per write.
    assert 2 <= len(deltas) <= 120, len(deltas)
    # At most one event per 50 ms (the default): only the last, sent as the block ends, may
    # follow sooner.
    # An event is stamped when it is made, which a loaded machine can delay for one and not the
    # next: so the rate over the stream, and no two events much closer than the interval.
    times = [datetime.fromisoformat(e.data["at"]).timestamp() for e in deltas[:-1]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) <= (times[-1] - times[0]) / 0.05 * 1.2 + 2, (len(gaps), times[-1] - times[0])
    assert min(gaps) >= 0.025, min(gaps)
    first = deltas[0].data
    assert set(first) == {"job_id", "type", "at", "attempt", "step", "text", "offset"}
    assert first["step"] == {"index": 2, "count": 3, "name": "write"}
    # The deltas come between the step's start and its end.
    types = [e.type for e in log]
    write_begins = next(
        i for i, e in enumerate(log) if e.type == "step" and e.data["step"]["index"] == 2
    )
    write_ends = next(
        i for i, e in enumerate(log) if e.type == "step_completed" and e.data["step"]["index"] == 2
    )
    assert all(write_begins < i < write_ends for i, t in enumerate(types) if t == "output")
    assert log[write_ends].data["output"] == {"characters": len(final)}


def test_resuming_from_every_event_id_gives_exactly_the_rest_of_the_text(
    out_stack: Stack,
) -> None:
    job = submit(out_stack.url, "streamer", {"words": 150, "word_seconds": 0.003})
    wait_state(out_stack.url, job["id"], {"completed"})
    status, full = read_stream(events_url(out_stack.url, job["id"]) + "?after=0")
    assert status == 200
    final = streamed_text(150)
    assert len(outputs(full)) >= 3, "too few deltas to resume between"
    for position, event in enumerate(full[:-1]):
        assert event.id is not None
        status, rest = read_stream(
            events_url(out_stack.url, job["id"]), headers={"Last-Event-ID": event.id}
        )
        assert status == 200
        assert [e.id for e in rest] == [e.id for e in full[position + 1 :]]
        seen = assemble(full[: position + 1])
        missed = "".join(e.data["text"] for e in outputs(rest))
        assert seen + missed == final, f"resumed after {event.id}"
        assert assemble(rest, seen) == final


def test_a_fresh_connect_mid_stream_continues_the_snapshot_s_text(out_stack: Stack) -> None:
    job = submit(out_stack.url, "streamer", {"words": 300, "word_seconds": 0.01})
    url = events_url(out_stack.url, job["id"])
    readers: list[StreamReader] = []
    try:
        for _ in range(6):
            time.sleep(0.4)
            readers.append(StreamReader(url).start())
        final = streamed_text(300)
        mid_stream = 0
        for reader in readers:
            events = reader.wait_closed(timeout=30)
            assert events[0].type == "snapshot" and events[-1].type == "completed"
            snapshot = events[0].data
            text = snapshot["steps"][1]["text"] or ""
            if 0 < len(text) < len(final):
                mid_stream += 1
                assert snapshot["steps"][1]["state"] == "running"
            assert shown(events) == final
        assert mid_stream >= 2, "fewer than two connects landed mid-stream"
    finally:
        for reader in readers:
            reader.close()


def test_a_finished_streamed_step_is_restored_whole_without_streaming_again(
    out_stack: Stack,
) -> None:
    job = submit(out_stack.url, "streamer", {"words": 60, "fail_finish_attempts": 1})
    done = wait_state(out_stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    _, log = read_stream(events_url(out_stack.url, job["id"]) + "?after=0")
    assert [e.data["attempt"] for e in log if e.type == "started"] == [1, 2]
    assert {e.data["attempt"] for e in outputs(log)} == {1}, "the second attempt streamed again"
    restored = [e for e in log if e.type == "step_completed" and e.data.get("restored")]
    assert [e.data["step"]["name"] for e in restored] == ["prepare", "write"]
    assert done["steps"][1]["text"] == streamed_text(60) == done["result"]["text"]


def test_the_demo_streams_its_summary_as_it_is_composed(out_stack: Stack) -> None:
    job = submit(out_stack.url, "analyze_document", {"text": DOC, "pace": 0.2})
    done = wait_state(out_stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    _, log = read_stream(events_url(out_stack.url, job["id"]) + "?after=0")
    deltas = outputs(log)
    assert {e.data["step"]["name"] for e in deltas} == {"Writing summary"}
    assert len(deltas) >= 3, "the summary was not streamed as it was composed"
    summary = done["result"]["summary"]
    assert "".join(e.data["text"] for e in deltas) == summary
    assert done["steps"][5]["text"] == summary


def test_a_large_write_is_split_into_bounded_events(out_stack: Stack) -> None:
    big = "é" * 40_000
    job = submit(out_stack.url, "token_stream", {"tokens": 1, "token": big})
    done = wait_state(out_stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    _, log = read_stream(events_url(out_stack.url, job["id"]) + "?after=0")
    deltas = [(e.data["offset"], len(e.data["text"])) for e in outputs(log)]
    assert deltas == [(0, 16_384), (16_384, 16_384), (32_768, 7_232)]
    assert done["steps"][0]["text"] == big


def test_an_offline_llm_reply_streams_into_its_step(out_stack: Stack) -> None:
    job = submit(out_stack.url, "streamer", {"words": 50, "llm": True})
    done = wait_state(out_stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    _, log = read_stream(events_url(out_stack.url, job["id"]) + "?after=0")
    reply = done["result"]["text"]
    # The offline model answers with the prompt's first 400 characters, a word at a time.
    assert reply == streamed_text(50).strip()[:400]
    assert len(outputs(log)) >= 2
    assert assemble(log) == reply == done["steps"][1]["text"]
    assert done["usage"]["calls"] == 1 and done["usage"]["output_tokens"] > 0


@pytest.mark.slow  # two attempts of a 4 s stream and a takeover: about 15 s
def test_a_worker_killed_mid_stream_restarts_the_text_visibly(make_stack: StackFactory) -> None:
    s = make_stack(STEPSTREAM_TASK_MODULES=OUTPUT_TASKS, STEPSTREAM_LEASE_SECONDS="1.5")
    words = 200
    job = submit(s.url, "streamer", {"words": words, "word_seconds": 0.02})
    reader = StreamReader(events_url(s.url, job["id"])).start()
    final = streamed_text(words)
    try:
        reader.wait_for(lambda ev: bool(ev) and len(shown(ev)) > 200, timeout=20)
        s.workers[0].kill()  # SIGKILL mid-stream
        left = get_job(s.url, job["id"])
        written = left["steps"][1]["text"] or ""
        assert left["state"] == "running" and left["steps"][1]["state"] == "running", left
        assert 200 < len(written) < len(final), "the kill did not land mid-stream"
        assert final.startswith(written)
        s.add_worker()
        events = reader.wait_closed(timeout=40)
    finally:
        reader.close()
    assert events[-1].type == "completed"
    restart = [e.data for e in outputs(events) if e.data["attempt"] == 2]
    assert restart and restart[0]["offset"] == 0, "the new attempt did not restart the text"
    assert {e.data["attempt"] for e in outputs(events)} == {1, 2}
    assert shown(events) == final
    record = wait_state(s.url, job["id"], {"completed"})
    assert record["steps"][1]["text"] == final == record["result"]["text"]


# -- the OpenAI-compatible provider's stream ------------------------------------------------


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatServer]:
    with chat_server() as server:
        yield server


def sse_reply(pieces: list[str], usage: dict[str, int] | None) -> Answer:
    lines = []
    for piece in pieces:
        chunk = {"model": "test-model", "choices": [{"index": 0, "delta": {"content": piece}}]}
        lines.append(f"data: {json.dumps(chunk)}\n\n")
    end = {"model": "test-model", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    lines.append(f"data: {json.dumps(end)}\n\n")
    if usage is not None:
        lines.append(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n")
    lines.append("data: [DONE]\n\n")
    return Answer(body="".join(lines).encode())


def test_an_openai_compatible_stream_is_read_delta_by_delta(chat: ChatServer) -> None:
    pieces = ["Hel", "lo, ", "wörld", " 🙂."]
    chat.reset(sse_reply(pieces, {"prompt_tokens": 7, "completion_tokens": 5}))
    got: list[str] = []

    async def run() -> tuple[str, int, int]:
        provider = OpenAIProvider(chat.url, "sk-test")
        try:

            async def on_delta(delta: str) -> None:
                got.append(delta)

            done = await provider.stream(
                [{"role": "user", "content": "Hi"}], model="m", on_delta=on_delta
            )
            return done.text, done.usage.input_tokens, done.usage.output_tokens
        finally:
            await provider.aclose()

    text, tokens_in, tokens_out = asyncio.run(run())
    assert got == pieces and text == "".join(pieces)
    assert (tokens_in, tokens_out) == (7, 5)
    body = chat.requests[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_a_stream_that_fails_before_it_starts_is_retried(chat: ChatServer) -> None:
    chat.reset(
        Answer(status=503, body={"error": {"message": "busy"}}),
        sse_reply(["fine"], None),
    )

    async def run() -> str:
        provider = OpenAIProvider(chat.url, max_retries=2, backoff=0.05)
        try:
            seen: list[str] = []

            async def on_delta(delta: str) -> None:
                seen.append(delta)

            done = await provider.stream(
                [{"role": "user", "content": "Hi"}], model="m", on_delta=on_delta
            )
            assert seen == ["fine"]
            assert done.usage.output_tokens > 0, "estimated when the server sends no usage"
            return done.text
        finally:
            await provider.aclose()

    assert asyncio.run(run()) == "fine"
    assert len(chat.requests) == 2


def test_stepstream_watch_prints_the_text_as_it_is_written(out_stack: Stack) -> None:
    job = submit(out_stack.url, "streamer", {"words": 120, "word_seconds": 0.01})
    watcher = LiveCli(out_stack.url, "watch", job["id"])
    try:
        watcher.wait_for_line(lambda line: line == "  write:")
        assert watcher.wait(timeout=30) == 0, watcher.stderr
    finally:
        watcher.stop()
    lines = watcher.lines
    at = lines.index("  write:")
    final = streamed_text(120)
    assert lines[at + 1] == final.rstrip("\n"), "the deltas did not add up on screen"
    assert lines[at + 2].startswith("  ✓ write done"), lines[at + 2]


def test_a_job_streams_an_openai_compatible_reply_and_counts_its_usage(
    module_stacks: StackFactory, chat: ChatServer
) -> None:
    s = module_stacks(
        STEPSTREAM_TASK_MODULES=OUTPUT_TASKS,
        STEPSTREAM_LLM_PROVIDER="openai",
        STEPSTREAM_LLM_BASE_URL=chat.url,
        STEPSTREAM_LLM_MODEL="test-model",
    )
    pieces = ["Stepstream ", "keeps ", "every ", "wörd 🙂."]
    chat.reset(sse_reply(pieces, {"prompt_tokens": 11, "completion_tokens": 6}))
    job = submit(s.url, "streamer", {"words": 5, "llm": True})
    done = wait_state(s.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    _, log = read_stream(events_url(s.url, job["id"]) + "?after=0")
    assert assemble(log) == "".join(pieces) == done["result"]["text"] == done["steps"][1]["text"]
    assert done["usage"]["input_tokens"] == 11 and done["usage"]["output_tokens"] == 6
    assert chat.requests[-1].body["stream"] is True
