"""LLM steps against a real local chat-completions server: retries, re-asks, usage and cost.

The provider tests call ``OpenAIProvider`` in this process; the job tests run a real web
process and worker whose provider points at the same local server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from stepstream.tasks.errors import RetryAfter
from stepstream.tasks.llm import (
    LLMRefused,
    LLMRequestError,
    LLMUnavailable,
    OfflineProvider,
    OpenAIProvider,
    Providers,
)
from stepstream.tasks.settings import Settings
from tests.conftest import Stack, StackFactory
from tests.support.api import submit, wait_state
from tests.support.chat_server import Answer, ChatServer, chat_server, error, reply
from tests.support.sse import Event, read_stream

AI_TASKS = "tests.support.tasks,tests.support.ai_tasks"
MESSAGES = [{"role": "user", "content": "Hello."}]


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatServer]:
    with chat_server() as server:
        yield server


@pytest.fixture(scope="module")
def llm_stack(module_stacks: StackFactory, chat: ChatServer) -> Stack:
    return module_stacks(
        STEPSTREAM_TASK_MODULES=AI_TASKS,
        STEPSTREAM_LLM_PROVIDER="openai",
        STEPSTREAM_LLM_BASE_URL=chat.url,
        STEPSTREAM_LLM_API_KEY="sk-test",
        STEPSTREAM_LLM_MODEL="test-model",
        STEPSTREAM_LLM_TIMEOUT_SECONDS="2",
    )


def complete(provider: OpenAIProvider) -> str:
    async def run() -> str:
        try:
            return (await provider.complete(MESSAGES, model="m")).text
        finally:
            await provider.aclose()

    return asyncio.run(run())


def full_log(stack: Stack, job_id: str) -> list[Event]:
    status, events = read_stream(f"{stack.url}/api/jobs/{job_id}/events?after=0")
    assert status == 200
    return events


# -- the provider on its own ---------------------------------------------------------------


def test_a_429_is_retried_after_the_delay_retry_after_asks_for(chat: ChatServer) -> None:
    chat.reset(error(429, "slow down", retry_after="1"), reply("hi"))
    assert complete(OpenAIProvider(chat.url, "sk-test")) == "hi"
    first, second = chat.requests
    assert second.at - first.at >= 0.95
    assert first.path == "/v1/chat/completions"
    assert first.headers["Authorization"] == "Bearer sk-test"
    assert first.body["messages"] == MESSAGES and first.body["model"] == "m"


def test_retry_after_ms_and_a_500_are_retried_inside_the_call(chat: ChatServer) -> None:
    chat.reset(
        error(500, "boom"),
        error(503, "busy", retry_after_ms="300"),
        reply("fine"),
    )
    provider = OpenAIProvider(chat.url, max_retries=2, backoff=0.05)
    assert complete(provider) == "fine"
    assert len(chat.requests) == 3
    assert chat.requests[2].at - chat.requests[1].at >= 0.28


def test_a_long_retry_after_is_handed_to_the_job_at_once(chat: ChatServer) -> None:
    # Waiting 30 s inside the call would hold a worker slot: the job retries after 30 s instead.
    chat.reset(error(429, "later", retry_after="30"))
    with pytest.raises(RetryAfter) as caught:
        complete(OpenAIProvider(chat.url, max_inline_wait=10))
    assert caught.value.seconds == 30
    assert len(chat.requests) == 1


def test_retries_run_out_as_a_retry_after_the_job_honours(chat: ChatServer) -> None:
    chat.reset(*[error(429, "busy", retry_after="0.1")] * 3)
    with pytest.raises(RetryAfter) as caught:
        complete(OpenAIProvider(chat.url, max_retries=2))
    assert caught.value.seconds == pytest.approx(0.1)
    assert len(chat.requests) == 3


def test_a_timeout_is_retried_then_transient(chat: ChatServer) -> None:
    # An answer that came at all (after its pause) would be an empty body, not a timeout.
    chat.reset(*[Answer(pause=1.0, body={})] * 2, default=reply("late"))
    with pytest.raises(LLMUnavailable, match=r"timed out after 0\.3s"):
        complete(OpenAIProvider(chat.url, timeout=0.3, max_retries=1, backoff=0.05))
    assert len(chat.requests) == 2


def test_a_content_policy_refusal_is_permanent(chat: ChatServer) -> None:
    chat.reset(error(400, "rejected by our content policy", code="content_policy_violation"))
    with pytest.raises(LLMRefused):
        complete(OpenAIProvider(chat.url))
    chat.reset(reply("", refusal="I can't help with that."))
    with pytest.raises(LLMRefused, match="can't help"):
        complete(OpenAIProvider(chat.url))
    chat.reset(error(401, "bad key", code="invalid_api_key"))
    with pytest.raises(LLMRequestError, match="401"):
        complete(OpenAIProvider(chat.url))
    assert len(chat.requests) == 1, "a 4xx is not retried"


def test_a_workers_providers_are_made_once_and_closed_with_it(chat: ChatServer) -> None:
    """Each worker holds its own (``ctx["llm_providers"]``): one client per configuration,
    pooling its connections across jobs, and closed at the worker's shutdown."""
    chat.reset(reply("one"), reply("two"))
    settings = Settings.model_validate(
        {"llm_provider": "openai", "llm_base_url": chat.url, "llm_api_key": "sk-test"}
    )

    async def run() -> None:
        providers = Providers()
        first = providers.get(settings)
        assert providers.get(settings) is first, "one client per configuration"
        assert (await first.complete(MESSAGES, model="m")).text == "one"
        offline = providers.get(settings.model_copy(update={"llm_provider": "offline"}))
        assert isinstance(offline, OfflineProvider)
        await providers.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await first.complete(MESSAGES, model="m")  # its HTTP client is closed
        again = providers.get(settings)
        assert again is not first
        try:
            assert (await again.complete(MESSAGES, model="m")).text == "two"
        finally:
            await providers.aclose()

    asyncio.run(run())
    assert len(chat.requests) == 2


def test_the_offline_provider_is_deterministic() -> None:
    async def run() -> tuple[str, str]:
        provider = OfflineProvider()
        a = await provider.complete([{"role": "user", "content": "One. Two."}], model="m")
        b = await provider.complete([{"role": "user", "content": "One. Two."}], model="m")
        assert a.usage.input_tokens == 2 and a.usage.calls == 1
        return a.text, b.text

    first, second = asyncio.run(run())
    assert first == second == "One."


# -- LLM steps in real jobs ------------------------------------------------------------------


GOOD = '{"summary": "Long jobs, streamed.", "words": 4}'


def test_a_job_rides_out_a_429_and_a_malformed_reply_and_adds_up_its_usage(
    llm_stack: Stack, chat: ChatServer
) -> None:
    chat.reset(
        error(429, "slow down", retry_after="1"),
        reply("Sure! Here is a summary: long jobs.", prompt_tokens=100, completion_tokens=10),
        reply("```json\n" + GOOD + "\n```", prompt_tokens=150, completion_tokens=20),
        reply("Done", prompt_tokens=5, completion_tokens=1),
    )
    job = submit(llm_stack.url, "llm_summarise", {})
    done = wait_state(llm_stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    assert done["result"]["summary"] == {"summary": "Long jobs, streamed.", "words": 4}
    assert done["result"]["note"] == "Done"
    assert done["attempt"] == 1, "the 429 was waited out inside the call"

    requests = chat.requests
    assert len(requests) == 4
    assert requests[1].at - requests[0].at >= 0.95, "Retry-After: 1 was honoured"
    # The re-ask carries the invalid reply and the validation error.
    reask = requests[2].body["messages"]
    assert reask[-2] == {"role": "assistant", "content": "Sure! Here is a summary: long jobs."}
    assert "does not fit the JSON schema" in reask[-1]["content"]
    assert requests[0].body["response_format"] == {"type": "json_object"}

    # Three answered calls (the 429 got no answer): 255 tokens in, 31 out.
    usage = done["usage"]
    assert usage["calls"] == 3
    assert usage["input_tokens"] == 255 and usage["output_tokens"] == 31
    assert usage["duration_ms"] > 1000, "the wait for the 429 counts in the call's duration"
    assert done["cost"] == pytest.approx(0.255 + 0.062 + 3 * 0.001)

    log = full_log(llm_stack, job["id"])
    steps = {e.data["step"]["name"]: e.data for e in log if e.type == "step_completed"}
    assert steps["summarise"]["usage"]["calls"] == 2
    assert steps["summarise"]["usage"]["input_tokens"] == 250
    assert steps["note"]["usage"] == {**steps["note"]["usage"], "calls": 1, "input_tokens": 5}
    assert "usage" not in steps["check"]
    calls = [e.data["usage"] for e in log if e.type == "log" and "usage" in e.data]
    assert [c["input_tokens"] for c in calls] == [100, 150, 5]
    assert sum(c["cost"] for c in calls) == pytest.approx(done["cost"])
    assert any("asking again" in e.data.get("message", "") for e in log if e.type == "log")
    by_name = {s["name"]: s for s in done["steps"]}
    assert by_name["summarise"]["usage"]["output_tokens"] == 30


def test_a_reply_invalid_twice_fails_the_job_permanently(
    llm_stack: Stack, chat: ChatServer
) -> None:
    chat.reset(reply("not json"), reply('{"summary": 3}'))
    job = submit(llm_stack.url, "llm_summarise", {})
    done = wait_state(llm_stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "failed"
    assert done["error"]["type"] == "LLMInvalidReply"
    assert done["error"]["retryable"] is False and done["error"]["step"] == "summarise"
    assert done["attempt"] == 1
    assert len(chat.requests) == 2, "asked again once, then gave up"
    assert done["usage"]["calls"] == 2, "both answered calls are paid for"


def test_a_checkpointed_call_is_not_made_or_paid_for_again_on_retry(
    llm_stack: Stack, chat: ChatServer
) -> None:
    chat.reset(reply(GOOD, prompt_tokens=100, completion_tokens=10), default=reply("ok", 5, 1))
    job = submit(llm_stack.url, "llm_summarise", {"fail_after_call_on_attempts": 2})
    done = wait_state(llm_stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    assert done["attempt"] == 3
    summarise_calls = [r for r in chat.requests if "Summarise" in str(r.body["messages"])]
    assert len(summarise_calls) == 1, "attempts 2 and 3 restored the call from its checkpoint"
    assert len(chat.requests) == 2
    assert done["usage"]["calls"] == 2
    assert done["cost"] == pytest.approx(0.1 + 0.02 + 0.005 + 0.002 + 2 * 0.001)
    log = full_log(llm_stack, job["id"])
    restored = [e for e in log if e.type == "step_completed" and e.data.get("restored")]
    assert [e.data["step"]["name"] for e in restored] == ["summarise", "summarise"]
    assert all("usage" not in e.data for e in restored)


def test_a_refusal_fails_the_job_without_retrying(llm_stack: Stack, chat: ChatServer) -> None:
    chat.reset(error(400, "flagged", code="content_policy_violation"))
    job = submit(llm_stack.url, "llm_summarise", {})
    done = wait_state(llm_stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "failed" and done["error"]["type"] == "LLMRefused"
    assert done["attempt"] == 1 and len(chat.requests) == 1
    assert done["usage"]["calls"] == 0 and done["cost"] == 0


def test_a_long_retry_after_becomes_the_jobs_retry_delay(
    llm_stack: Stack, chat: ChatServer
) -> None:
    # Above the inline limit (10 s by default)? Here 11 s would slow the suite: the worker's
    # inline retries run out on three short 429s instead, and the job retries after 1 s.
    chat.reset(*[error(429, "busy", retry_after="1")] * 3, reply(GOOD), default=reply("ok"))
    job = submit(llm_stack.url, "llm_summarise", {})
    done = wait_state(llm_stack.url, job["id"], {"completed", "failed"}, timeout=30)
    assert done["state"] == "completed", done["error"]
    assert done["attempt"] == 2
    log = full_log(llm_stack, job["id"])
    retrying = next(e for e in log if e.type == "retrying")
    assert retrying.data["error"]["type"] == "RetryAfter"
    started = [e for e in log if e.type == "started"][1]
    gap = chat.requests[3].at - chat.requests[2].at
    assert gap >= 0.95, "the job waited the server's Retry-After before its next attempt"
    assert started.data["at"] >= retrying.data["retry_at"]


def test_the_offline_provider_runs_a_structured_step_without_a_network(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(STEPSTREAM_TASK_MODULES=AI_TASKS)  # the default provider is offline
    job = submit(stack.url, "llm_offline", {})
    done = wait_state(stack.url, job["id"], {"completed", "failed"})
    assert done["state"] == "completed", done["error"]
    assert done["result"]["summary"] and done["result"]["words"] >= 0
    assert done["usage"]["calls"] == 1 and done["usage"]["input_tokens"] > 0
    again = wait_state(stack.url, submit(stack.url, "llm_offline", {})["id"], {"completed"})
    assert again["result"] == done["result"], "the offline provider is deterministic"
