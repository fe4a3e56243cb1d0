"""One trace per job (docs/observability.md), across real processes: a web process and workers
export OTLP/HTTP to a receiver the test runs, and the test reads the trace they built.

A job submitted inside the test's own span, failing once, killed with its worker, or waiting
for an answer, is one trace: the submit span under the caller's, every attempt under the
submit span (whichever worker, however long after), steps and their checkpoints, each span
naming the log event that ended it. Off, nothing imports OpenTelemetry at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from stepstream import Client
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import submit, wait_state
from tests.support.chat_server import chat_server, error, reply
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import ROOT, TEST_TASKS, Valkey, wait_until
from tests.support.sse import Event, read_stream
from tests.support.tasks import executions_key, gate_key

pytestmark = pytest.mark.slow

SERVER_KIND, CLIENT_KIND = 2, 3  # OTLP's SpanKind
ERROR_STATUS = 2


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


def traced_stack(make_stack: StackFactory, receiver: OtlpReceiver, workers: int) -> Stack:
    return make_stack(
        webs=1,
        workers=workers,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_BSP_SCHEDULE_DELAY="50",  # spans arrive within a tenth of a second
        STEPSTREAM_LOG_FORMAT="json",
    )


def job_log(base: str, job_id: str, token: str = "") -> list[Event]:
    query = f"?after=0&token={token}" if token else "?after=0"
    status, events = read_stream(f"{base}/api/jobs/{job_id}/events{query}")
    assert status == 200
    return events


def of_trace(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return sorted((s for s in spans if s.parent_id == parent.span_id), key=lambda s: s.start_ns)


def attempts(spans: list[ReceivedSpan], task: str) -> list[ReceivedSpan]:
    return sorted(named(spans, f"attempt {task}"), key=lambda s: s.start_ns)


def test_a_job_that_fails_once_is_one_trace_under_the_caller_s_span(
    make_stack: StackFactory, receiver: OtlpReceiver
) -> None:
    s = traced_stack(make_stack, receiver, workers=2)
    # The host's own tracing: a provider of its own (not the global one), and a span that is
    # current while it submits. Client.submit sends the span's context by itself.
    host = TracerProvider().get_tracer("host")
    with host.start_as_current_span("host request") as parent, Client(s.url) as client:
        job = client.submit("counted", {"transient_failures": 1}, subject="user-7")
    caller = parent.get_span_context()
    trace_id, caller_id = f"{caller.trace_id:032x}", f"{caller.span_id:016x}"
    assert wait_state(s.url, job.id, {"completed", "failed"})["state"] == "completed"
    log = job_log(s.url, job.id, job.stream_token or "")
    ids = {e.type: e.id for e in log}  # the last event of each type

    spans = receiver.wait_for(
        lambda got: (
            len(attempts(of_trace(got, trace_id), "counted")) == 2
            and len(named(of_trace(got, trace_id), "step five")) == 1
        ),
        timeout=20,
        what="both attempts of the job in the caller's trace",
    )
    mine = of_trace(spans, trace_id)

    # The web process: its request span is the caller's child, named by its route.
    (request,) = [s for s in mine if s.name == "POST /api/jobs"]
    assert request.parent_id == caller_id and request.kind == SERVER_KIND
    assert request.attributes["http.route"] == "/api/jobs"
    assert request.attributes["http.response.status_code"] == 202
    (submit_span,) = named(mine, "submit counted")
    assert submit_span.parent_id == request.span_id
    assert submit_span.service == "stepstream-web"
    assert submit_span.attributes["stepstream.job_id"] == job.id
    assert submit_span.attributes["stepstream.task"] == "counted"
    assert submit_span.attributes["stepstream.subject"] == "user-7"
    assert submit_span.attributes["stepstream.event_id"] == log[0].id  # `queued`

    # Two attempts, each a child of the submit span, on the workers.
    first, second = attempts(mine, "counted")
    for attempt in (first, second):
        assert attempt.parent_id == submit_span.span_id
        assert attempt.service == "stepstream-worker"
        assert attempt.attributes["stepstream.worker"]
    assert first.attributes["stepstream.outcome"] == "retrying"
    assert first.attributes["error.type"] == "TransientError"
    assert first.attributes["stepstream.error.retryable"] is True
    assert first.status_code == ERROR_STATUS
    assert "retrying" in first.event_names()
    assert first.attributes["stepstream.event_id"] == ids["retrying"]
    assert second.attributes["stepstream.outcome"] == "completed"
    assert second.attributes["stepstream.event_id"] == ids["completed"]
    # The backoff between them is a gap, not part of either attempt.
    assert first.end_ns <= second.start_ns

    # The steps: one, two, and the failing three in the first attempt; in the second, one and
    # two restored from their checkpoints (not run again), then three, four, five.
    def steps(attempt: ReceivedSpan) -> list[tuple[str, str, bool]]:
        return [
            (
                s.attributes["stepstream.step.name"],
                s.attributes["stepstream.step.state"],
                s.attributes.get("stepstream.step.stored", False),
            )
            for s in children(mine, attempt)
            if s.name.startswith("step ")
        ]

    assert steps(first) == [
        ("one", "completed", False),
        ("two", "completed", False),
        ("three", "failed", False),
    ]
    assert steps(second) == [
        ("one", "restored", True),
        ("two", "restored", True),
        ("three", "completed", False),
        ("four", "completed", False),
        ("five", "completed", False),
    ]
    assert s.redis().hgetall(executions_key(job.id)) == {
        "one": "1",
        "two": "1",
        "three": "2",
        "four": "1",
        "five": "1",
    }
    # Every step span names the log event that ended it: its own step_completed, or for the
    # failed step the runtime's `retrying`.
    completed = {e.id for e in log if e.type == "step_completed"}
    for attempt in (first, second):
        for step in children(mine, attempt):
            event_id = step.attributes["stepstream.event_id"]
            if step.attributes["stepstream.step.state"] == "failed":
                assert event_id == ids["retrying"]
            else:
                assert event_id in completed
    assert len({c.attributes["stepstream.event_id"] for c in children(mine, second)}) == 5

    # The worker's log lines of the job carry the trace and the attempt's span.
    lines = [
        json.loads(line)
        for worker in s.workers
        for line in worker.log().splitlines()
        if line.startswith("{") and job.id in line
    ]
    started = [line for line in lines if line["msg"].startswith("job started")]
    assert {(line["trace_id"], line["span_id"]) for line in started} == {
        (trace_id, first.span_id),
        (trace_id, second.span_id),
    }

    # The stream: one span for the connection, with what it sent; its token is nowhere.
    spans = receiver.wait_for(
        lambda got: any(x.name == "GET /api/jobs/{job_id}/events" for x in got),
        timeout=20,
        what="the stream's span",
    )
    (stream,) = [x for x in spans if x.name == "GET /api/jobs/{job_id}/events"]
    assert stream.attributes["stepstream.stream.events_sent"] == len(log)
    assert stream.attributes["stepstream.stream.resumed"] is True  # ?after=0
    assert job.stream_token and len(job.stream_token) > 16
    for span in spans:
        for value in span.attributes.values():
            assert job.stream_token not in str(value), (span.name, value)


def test_a_killed_worker_s_job_continues_its_trace_on_the_next_worker(
    make_stack: StackFactory, receiver: OtlpReceiver
) -> None:
    s = traced_stack(make_stack, receiver, workers=1)
    job = submit(s.url, "counted", {"gate_at": "four"})
    r = s.redis()
    wait_until(lambda: r.hget(executions_key(job["id"]), "four") == "1", 20, what="step four")
    spans = receiver.wait_for(
        lambda got: bool(named(got, "step three")), timeout=20, what="the first worker's steps"
    )
    (submit_span,) = [x for x in named(spans, "submit counted")]
    (three,) = named(spans, "step three")
    s.workers[0].kill()  # SIGKILL mid-step: its attempt's span is never sent
    s.add_worker()
    r.rpush(gate_key(job["id"]), "go")
    assert wait_state(s.url, job["id"], {"completed", "failed"})["state"] == "completed"

    spans = receiver.wait_for(
        lambda got: bool(attempts(got, "counted")) and bool(named(got, "step five")),
        timeout=20,
        what="the second worker's attempt",
    )
    (taken_over,) = attempts(spans, "counted")
    assert taken_over.attributes["stepstream.attempt"] == 2
    assert taken_over.attributes["stepstream.outcome"] == "completed"
    # The same trace, under the same submit span, as the dead worker's steps.
    assert taken_over.trace_id == submit_span.trace_id == three.trace_id
    assert taken_over.parent_id == submit_span.span_id
    restored = [
        x.attributes["stepstream.step.name"]
        for x in children(spans, taken_over)
        if x.attributes.get("stepstream.step.stored")
    ]
    assert restored == ["one", "two", "three"]


def test_a_job_waiting_for_input_keeps_its_trace_across_the_wait(
    make_stack: StackFactory, receiver: OtlpReceiver
) -> None:
    s = traced_stack(make_stack, receiver, workers=1)
    job = submit(s.url, "asks")
    wait_state(s.url, job["id"], {"waiting"})
    answer = http.post(
        f"{s.url}/api/jobs/{job['id']}/input",
        json={"name": "decision", "value": {"approved": True}},
        timeout=10,
    )
    assert answer.status_code == 202, answer.text
    assert wait_state(s.url, job["id"], {"completed", "failed"})["state"] == "completed"

    spans = receiver.wait_for(
        lambda got: len(attempts(got, "asks")) == 2 and bool(named(got, "step after")),
        timeout=20,
        what="both runs of the job",
    )
    (submit_span,) = named(spans, "submit asks")
    before, after = attempts(spans, "asks")
    assert before.trace_id == after.trace_id == submit_span.trace_id
    assert before.parent_id == after.parent_id == submit_span.span_id
    assert before.attributes["stepstream.outcome"] == "waiting"
    (waiting,) = [e for e in before.events if e.name == "waiting"]
    assert waiting.attributes["stepstream.input.name"] == "decision"
    (given,) = [e for e in after.events if e.name == "input"]
    assert given.attributes["stepstream.input.by"] == "anonymous"
    # The wait is the gap between the runs, not part of either.
    assert before.end_ns <= after.start_ns
    assert [x.attributes.get("stepstream.step.stored", False) for x in children(spans, after)] == [
        True,
        False,
    ]


def test_a_batch_is_one_trace_with_every_child_s_attempt_under_its_submit(
    make_stack: StackFactory, receiver: OtlpReceiver
) -> None:
    s = traced_stack(make_stack, receiver, workers=1)
    trace_id, caller_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    answer = http.post(
        f"{s.url}/api/batches",
        json={"task": "counted", "inputs": [{}, {}, {}]},
        headers={"traceparent": f"00-{trace_id}-{caller_id}-01"},
        timeout=10,
    )
    assert answer.status_code == 202, answer.text
    batch = answer.json()
    assert wait_state(s.url, batch["id"], {"completed", "failed"})["state"] == "completed"
    spans = receiver.wait_for(
        lambda got: len(attempts(got, "counted")) == 3, timeout=20, what="the children's attempts"
    )
    (request,) = named(spans, "POST /api/batches")
    (batch_span,) = named(spans, "submit batch counted")
    assert request.trace_id == trace_id and request.parent_id == caller_id
    assert batch_span.parent_id == request.span_id
    assert batch_span.attributes["stepstream.batch.size"] == 3
    children_ids = {a.attributes["stepstream.job_id"] for a in attempts(spans, "counted")}
    assert len(children_ids) == 3 and batch["id"] not in children_ids
    for attempt in attempts(spans, "counted"):
        assert attempt.trace_id == trace_id and attempt.parent_id == batch_span.span_id


def test_a_model_call_is_a_genai_span_with_its_usage_cost_and_retry_wait(
    make_stack: StackFactory, receiver: OtlpReceiver
) -> None:
    with chat_server() as chat:
        chat.reset(
            error(429, "slow down", retry_after="1"),
            reply('{"summary": "Long jobs.", "words": 2}', prompt_tokens=150, completion_tokens=20),
            reply("Done", prompt_tokens=5, completion_tokens=1),
        )
        s = make_stack(
            webs=1,
            workers=1,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_BSP_SCHEDULE_DELAY="50",
            STEPSTREAM_TASK_MODULES="tests.support.tasks,tests.support.ai_tasks",
            STEPSTREAM_LLM_PROVIDER="openai",
            STEPSTREAM_LLM_BASE_URL=chat.url,
            STEPSTREAM_LLM_API_KEY="sk-test",
            STEPSTREAM_LLM_MODEL="test-model",
        )
        job = submit(s.url, "llm_summarise", {})
        done = wait_state(s.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    log = job_log(s.url, job["id"])
    spent = [e.id for e in log if e.type == "log" and "usage" in e.data]

    spans = receiver.wait_for(
        lambda got: len(named(got, "chat test-model")) == 2, timeout=20, what="the model calls"
    )
    summarise, note = sorted(named(spans, "chat test-model"), key=lambda x: x.start_ns)
    (step,) = named(spans, "step summarise")
    assert summarise.parent_id == step.span_id and summarise.kind == CLIENT_KIND
    assert summarise.attributes["gen_ai.operation.name"] == "chat"
    assert summarise.attributes["gen_ai.system"] == "openai"
    assert summarise.attributes["gen_ai.request.model"] == "test-model"
    assert summarise.attributes["gen_ai.response.model"] == "test-model"
    assert summarise.attributes["gen_ai.usage.input_tokens"] == 150
    assert summarise.attributes["gen_ai.usage.output_tokens"] == 20
    assert summarise.attributes["stepstream.llm.cost"] == pytest.approx(0.15 + 0.04 + 0.001)
    (wait,) = [e for e in summarise.events if e.name == "retry_wait"]
    assert wait.attributes["stepstream.wait_seconds"] == 1.0
    assert wait.attributes["error.type"] == "RetryAfter"
    assert "retry_wait" not in note.event_names()
    # Each call's span ends with the log event that accounts for its spending.
    assert [
        summarise.attributes["stepstream.event_id"],
        note.attributes["stepstream.event_id"],
    ] == (spent)


_OFF_CHECK = textwrap.dedent(
    """
    import asyncio, sys
    from starlette.testclient import TestClient
    from arq.connections import RedisSettings, create_pool
    from stepstream.server.app import create_app
    from stepstream.tasks import tracing, worker
    from stepstream.tasks.runtime import run_job
    from stepstream.tasks.settings import get_settings

    settings = get_settings()
    worker.worker_settings(settings)
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/api/jobs",
            json={"task": "counted", "input": {}},
            headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        )
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]

    async def run() -> None:
        ctx = {"job_try": 1, "job_id": job_id}
        await worker.startup(ctx, settings=settings, registry=create_app(settings).registry)
        ctx["redis"] = await create_pool(RedisSettings.from_dsn(settings.redis_url))
        try:
            await run_job(ctx, job_id)
        finally:
            await ctx["redis"].aclose()
            await worker.shutdown(ctx)

    asyncio.run(run())
    with TestClient(create_app(settings)) as client:
        assert client.get(f"/api/jobs/{job_id}").json()["state"] == "completed"
    from stepstream._base import submit_request
    assert "traceparent" not in submit_request("counted", {}, None).headers
    loaded = sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry")
    print("LOADED", len(loaded), tracing.start_span("x") is tracing.NO_SPAN)
    """
)


@pytest.mark.parametrize("tracing_on", [False, True])
def test_with_tracing_off_a_job_runs_without_importing_opentelemetry(
    valkey: Valkey, receiver: OtlpReceiver, tracing_on: bool
) -> None:
    """The web app and the worker run a job end to end in one process; off, not one
    ``opentelemetry`` module is loaded and spans are the no-op. (On, the same check sees them
    loaded: the check can fail.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        REDIS_URL=valkey.url,
        STEPSTREAM_PREFIX=f"off{int(tracing_on)}{os.getpid()}:",
        STEPSTREAM_TASK_MODULES=TEST_TASKS,
        STEPSTREAM_MODE="development",  # the test client's address is not a loopback one
        PYTHONPATH=str(ROOT),
    )
    if tracing_on:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url
    done = subprocess.run(
        [sys.executable, "-c", _OFF_CHECK],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("LOADED")]
    _, count, no_span = line.split()
    if tracing_on:
        assert int(count) > 0 and no_span == "False"
    else:
        assert int(count) == 0 and no_span == "True"


_HOST_PROVIDER = textwrap.dedent(
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    from stepstream.tasks import tracing

    span = tracing.start_span("submit demo", {"stepstream.job_id": "j1"})
    span.end("1-0")
    assert trace.get_tracer_provider() is provider
    (got,) = exporter.get_finished_spans()
    print("SPAN", got.name, got.attributes["stepstream.event_id"])
    """
)


def test_an_application_s_own_tracer_provider_is_used_as_it_is() -> None:
    """No OTEL_* variable: an application that set up its provider gets Stepstream's spans
    there, and its provider is not replaced by one of Stepstream's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _HOST_PROVIDER],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SPAN submit demo 1-0" in done.stdout
