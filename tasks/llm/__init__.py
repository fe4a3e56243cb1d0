"""LLM calls as job steps: ``await ctx.llm(messages, response_model=Model, step="Summarise")``.

Two providers speak one small interface (:class:`Provider`): :class:`OpenAIProvider` posts to
``{STEPSTREAM_LLM_BASE_URL}/chat/completions`` of any OpenAI-compatible server, and
:class:`OfflineProvider` answers deterministically without a network (demos, tests, CI). Pick
one with ``STEPSTREAM_LLM_PROVIDER=offline|openai``.

Failure rules (docs/ai-workloads.md):

- 429, 5xx, timeouts and dropped connections are transient. They are retried *inside* the call
  up to ``STEPSTREAM_LLM_MAX_RETRIES`` times, waiting what ``Retry-After`` (or
  ``retry-after-ms``) asks when that is at most ``STEPSTREAM_LLM_MAX_INLINE_WAIT_SECONDS``, else
  a short exponential backoff. A short wait inside the call is cheaper than a job retry (no
  ``retrying``/``started`` events, the step's other work is kept); a long one would hold a
  worker slot idle, so past that limit, or when the retries run out, the call raises
  :class:`~tasks.errors.RetryAfter` (or a ``TransientError`` when the server named no delay)
  and the *job* retries after exactly that delay; its completed steps are restored from their
  checkpoints, so no succeeded call is made (or paid for) twice.
- A content-policy refusal (an HTTP 400 whose error code says so, ``finish_reason ==
  "content_filter"``, or a ``refusal`` in the message) is permanent: :class:`LLMRefused`.
  Any other 4xx (a bad key, an unknown model) is permanent too: :class:`LLMRequestError`.
- With ``response_model`` the reply must be a JSON object that validates. An invalid reply is
  asked again once, with the validation error in the conversation; a second invalid reply is
  permanent: :class:`LLMInvalidReply`. Both calls are counted and paid for.

Every call that got an answer is accounted for at once: a ``log`` event carries its ``usage``
and the job record's ``usage`` and ``cost`` totals move in the same atomic append; the step's
``step_completed`` carries the step's ``usage``. A budget check before each call refuses the
call (``BudgetExceeded``, permanent) when it would take the job past its budget.

The modules: ``completion`` (the messages, :class:`Completion` and the :class:`Provider`
protocol), ``provider`` (the OpenAI-compatible one) with ``streaming`` (its streamed reply),
``offline`` (the offline model), ``providers`` (a worker's providers, from its settings),
``steps`` (``ctx.llm``: budget, accounting, spans, checkpointed steps) and ``errors``. Every
name is imported from here.
"""

from __future__ import annotations

from stepstream.tasks.llm.completion import Completion, Message, Provider
from stepstream.tasks.llm.errors import (
    LLMInvalidReply,
    LLMRefused,
    LLMRequestError,
    LLMUnavailable,
)
from stepstream.tasks.llm.offline import OfflineProvider
from stepstream.tasks.llm.provider import OpenAIProvider, parse_retry_after
from stepstream.tasks.llm.providers import Providers, make_provider
from stepstream.tasks.llm.steps import ask, llm_step, parse_reply, schema_message

__all__ = [
    "Completion",
    "LLMInvalidReply",
    "LLMRefused",
    "LLMRequestError",
    "LLMUnavailable",
    "Message",
    "OfflineProvider",
    "OpenAIProvider",
    "Provider",
    "Providers",
    "ask",
    "llm_step",
    "make_provider",
    "parse_reply",
    "parse_retry_after",
    "schema_message",
]
