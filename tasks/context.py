"""What a running task sees: ``step()``, ``run_step()``, ``progress()``, ``log()``, ``output()``,
``map()``/``spawn()``/``join()`` (child jobs, tasks/children.py), ``attempt``.

Every call appends one event through the store's atomic append, in order, through the job's
``EventWriter`` (tasks/writer.py): ``progress()`` and ``log()`` do not wait for Redis to answer,
so a burst of them shares round trips; steps and spending wait until they are stored. Each
append also checks the job's cancel flag, so a cancelled job stops at its next event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import to_jsonable_python

from stepstream.tasks import children, inputs, tracing
from stepstream.tasks.commands import Command
from stepstream.tasks.cost import BudgetExceeded
from stepstream.tasks.errors import StepTimeout
from stepstream.tasks.models import EventType, JobRecord, StepRecord, StepRef, Usage, utcnow
from stepstream.tasks.output import StepText, text_commands
from stepstream.tasks.registry import TaskSpec
from stepstream.tasks.store import JobStore, new_event
from stepstream.tasks.writer import EventWriter

if TYPE_CHECKING:
    from arq.connections import ArqRedis

    from stepstream.tasks.llm import Message, Providers
    from stepstream.tasks.registry import TaskRegistry

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@lru_cache(maxsize=256)
def _adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


def _return_type(fn: Callable[..., Any]) -> Any:
    """``fn``'s declared return type, or None when it has none we can resolve (a lambda)."""
    try:
        return typing.get_type_hints(fn).get("return")
    except Exception:  # a name only the defining scope knows, or not a function at all
        return None


class StepHandle:
    """Yielded by ``step()``: set ``output`` to attach a partial result to ``step_completed``."""

    def __init__(self, ref: StepRef) -> None:
        self.ref = ref
        self.output: Any = None


class TaskContext:
    def __init__(
        self,
        store: JobStore,
        spec: TaskSpec,
        record: JobRecord,
        llm_providers: Providers,
        *,
        registry: TaskRegistry | None = None,
        arq: ArqRedis | None = None,
    ) -> None:
        self.store = store
        self.spec = spec
        self.registry = registry  # the worker's tasks, and its arq client: for child jobs
        self.arq = arq
        self.subject = record.subject
        self.depth = record.depth
        self._fanouts = 0  # map/spawn calls so far in this run: each names its children
        self.llm_providers = llm_providers  # the worker's, which ``llm()`` calls through
        self.job_id = record.id
        self.attempt = record.attempt
        self.max_attempts = spec.max_attempts
        self.owner = record.owner
        self.current_step: StepRef | None = None
        self.steps: list[StepRecord] = self._initial_steps(record)
        # LLM spending (tasks/llm/): the totals so far, earlier attempts included.
        self.usage: Usage = record.usage
        self.cost: float = record.cost
        self.budget: float | None = record.budget if record.budget is not None else spec.budget
        self._reserved = 0.0  # estimates of calls in flight, so concurrent calls share a budget
        self._step_usage: Usage | None = None
        self._step_text: StepText | None = None  # the current step's text, once it writes some
        self.writer = EventWriter(store, record.id, record.owner)
        self.answers = record.answers  # the inputs given so far (wait_for_input)
        # Tracing (tasks/tracing.py): the attempt's span (set by the runtime) and the current
        # step's, open from its start to the event that ends it.
        self.span: tracing.Span = tracing.NO_SPAN
        self._step_span: tracing.Span = tracing.NO_SPAN

    def _initial_steps(self, record: JobRecord) -> list[StepRecord]:
        by_name = {s.name: s for s in record.steps}
        return [
            by_name.get(name) or StepRecord(index=i, name=name)
            for i, name in enumerate(self.spec.steps, start=1)
        ]

    # -- the task's API -------------------------------------------------------------------

    @asynccontextmanager
    async def step(
        self, name: str, *, timeout: float | None = None, retry_timeout: bool = True
    ) -> AsyncIterator[StepHandle]:
        """Run a block as the declared step ``name``: emits ``step``, then ``step_completed``.

        Not checkpointed: a with-block cannot be skipped, so when the job runs again (a
        retry, a killed worker, a deploy) the block runs again from the start, even if it
        completed before. Use it for steps that are cheap and safe to redo; use
        ``run_step()`` for a step that must not run twice.

        With ``timeout`` the block is interrupted after that many seconds with a
        ``StepTimeout``, a transient error unless ``retry_timeout`` is false.
        """
        ref = self._ref(name)
        started = time.perf_counter()
        await self._begin_step(ref)
        handle = StepHandle(ref)
        try:
            with self._step_span.current():
                async with self._deadline(name, timeout, retry_timeout):
                    yield handle
        except BaseException as exc:
            self._step_failed(exc)
            raise
        await self._complete_step(ref, started, handle.output)

    @asynccontextmanager
    async def _deadline(
        self, name: str, timeout: float | None, retryable: bool
    ) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(timeout) as deadline:
                yield
        except TimeoutError as exc:
            if deadline.expired():
                raise StepTimeout(f"step {name!r} timed out after {timeout:g}s", retryable) from exc
            raise

    async def run_step(
        self,
        name: str,
        fn: Callable[[], Awaitable[T]],
        *,
        output: Callable[[T], Any] | None = None,
        timeout: float | None = None,
        retry_timeout: bool = True,
    ) -> T:
        """Run ``fn`` as the declared step ``name``, checkpointed; return what it returns.

        The value is stored with the step (as JSON, so it must be serialisable: plain data,
        pydantic models, dataclasses). When the job runs again (a retry, a killed worker, a
        deploy) a step that completed before is not run again: the stored value is returned
        and ``step_completed`` says ``restored: true``. If ``fn`` declares its return type,
        the restored value is validated back into that type (a model comes back a model);
        a stored value that no longer fits it (the code changed in between) is not restored,
        and the step runs again.

        ``output`` turns the value into the short partial result the log and the dashboard
        show on ``step_completed``; without it they show the value itself.
        """
        ref = self._ref(name)
        done = self.steps[ref.index - 1]
        if done.state in ("completed", "restored"):
            stored = done.output if output is None else done.value
            returns = _return_type(fn)
            try:
                restored: T = (
                    stored if returns is None else _adapter(returns).validate_python(stored)
                )
            except ValidationError:  # stored by other code (a deploy in between): run again
                await self.log(
                    f"step {name!r}: its stored value no longer fits; running it again", "warning"
                )
            else:
                await self._restore_step(ref, done)
                return restored
        started = time.perf_counter()
        await self._begin_step(ref)
        try:
            with self._step_span.current():
                async with self._deadline(name, timeout, retry_timeout):
                    value = await fn()
        except BaseException as exc:
            self._step_failed(exc)
            raise
        stored = to_jsonable_python(value)
        if output is None:
            await self._complete_step(ref, started, stored)
        else:
            await self._complete_step(ref, started, to_jsonable_python(output(value)), stored)
        return value

    async def progress(self, current: float, total: float, message: str | None = None) -> None:
        """Progress inside the current step: "Analysed 23 of 50 documents"."""
        fraction = 0.0 if total <= 0 else max(0.0, min(1.0, current / total))
        index = self.current_step.index if self.current_step else 1
        overall = ((index - 1) + fraction) / len(self.spec.steps)
        await self._emit(
            EventType.progress,
            {"current": current, "total": total, "message": message},
            {"progress": round(overall, 4), "message": message},
            wait=False,
        )

    async def log(self, message: str, level: str = "info") -> None:
        await self._emit(EventType.log, {"level": level, "message": message}, {}, wait=False)

    @asynccontextmanager
    async def output(self) -> AsyncIterator[StepText]:
        """Stream text into the current step: ``async with ctx.output() as out: await
        out.write(delta)``. Each delta becomes part of an ``output`` event (gathered, at most one
        event per ``STEPSTREAM_OUTPUT_INTERVAL_SECONDS``), and the step's text so far is in the
        record's ``steps[i].text``. Several blocks in one step continue one text; what waits
        is sent when the block ends."""
        if self.current_step is None:
            raise RuntimeError("ctx.output() writes into the current step: use it inside a step")
        if self._step_text is None:
            self._step_text = StepText(
                self._emit_output, self.store.settings.output_interval_seconds
            )
        text = self._step_text
        try:
            yield text
        except Exception:
            with contextlib.suppress(Exception):  # the block's own error is the one to see
                await text.flush()
            raise
        await text.flush()

    @overload
    async def llm(
        self,
        messages: list[Message],
        *,
        response_model: type[M],
        step: str | None = None,
        **options: Any,
    ) -> M: ...

    @overload
    async def llm(
        self,
        messages: list[Message],
        *,
        response_model: None = None,
        step: str | None = None,
        **options: Any,
    ) -> str: ...

    async def llm(
        self,
        messages: list[Message],
        *,
        response_model: type[M] | None = None,
        step: str | None = None,
        **options: Any,
    ) -> M | str:
        """One LLM call (tasks/llm/), as the checkpointed step ``step`` when given: a call
        that succeeded is restored, never made again, when the job runs again. Options:
        ``model``, ``max_tokens``, ``temperature``, ``pricing``, ``timeout``, and ``stream=True``:
        the reply is streamed into the step as it is written (tasks/output.py)."""
        from stepstream.tasks.llm import (
            llm_step,
        )  # tasks.llm needs this module's class for its hints

        return await llm_step(self, messages, response_model=response_model, step=step, **options)

    async def wait_for_input(
        self,
        name: str,
        *,
        schema: type[M],
        prompt: str | None = None,
        timeout: float | None = None,
        default: M | dict[str, Any] | None = None,
    ) -> M:
        """Wait for a person to give the input ``name``, a ``schema`` instance (tasks/inputs.py).

        Without a stored answer the job goes to ``waiting`` and this run ends here, holding no
        worker; the answer queues the job again and it runs from the top: ``run_step`` steps
        are restored, code outside them runs again, and this call returns the answer. After
        ``timeout`` seconds unanswered the job fails with ``InputTimeout``, or, with a
        ``default``, goes on with it.
        """
        return await inputs.wait_for_input(
            self, name, schema, prompt=prompt, timeout=timeout, default=default
        )

    async def map(
        self,
        task: str | TaskSpec,
        inputs: Sequence[Mapping[str, Any] | BaseModel],
        *,
        step: str | None = None,
        concurrency: int | None = None,
        on_failure: children.OnFailure = "fail",
        max_failures: int | None = None,
    ) -> list[Any]:
        """Run ``task`` as one child job per input and return their results in input order,
        each validated into the child task's output model (tasks/children.py).

        The children run on any worker while this job waits holding none (``waiting``); the
        last child's end queues it again, and it runs from the top: ``run_step`` steps are
        restored, and this call finds its children (never starting them twice) and returns
        their results. With ``step`` the call runs as that declared step, whose progress rolls
        up from the children ("23 of 50 done"). ``concurrency``: at most that many of these
        children run at once. ``on_failure="fail"`` (the default) fails this job at the first
        child that fails, cancelling the others; ``"collect"`` puts a ``ChildFailed`` in place
        of each failed child's result; ``max_failures=n`` tolerates n failures, then fails.
        """
        tolerated = children.tolerance(on_failure, max_failures)
        spec = self.registry_spec(task)
        group = self._next_group(step)
        ref = None if step is None else self._ref(step)
        started = time.perf_counter()
        if ref is not None and self.steps[ref.index - 1].state == "waiting":
            # Resumed from the wait for these children: the step goes on where it was (its
            # progress rolled up meanwhile), without beginning again from 0.
            self.current_step = ref
            self.steps[ref.index - 1].state = "running"
        elif ref is not None and self.current_step != ref:
            await self._begin_step(ref)
        handles, created = await children.start(
            self,
            group,
            [(spec, children.as_input(item)) for item in inputs],
            step=None if ref is None else (ref.index, ref.count),
            concurrency=concurrency,
        )
        if ref is not None and created:
            await self._emit(
                EventType.progress,
                {"current": 0, "total": len(handles), "message": f"0 of {len(handles)} done"},
                {},
            )
        results = await children.join(self, handles, tolerated)
        if ref is not None:
            done = sum(not isinstance(r, children.ChildFailed) for r in results)
            await self._complete_step(ref, started, {"children": len(results), "completed": done})
        return results

    async def spawn(
        self, task: str | TaskSpec, input: Mapping[str, Any] | BaseModel
    ) -> children.ChildHandle:
        """Start one child job of ``task`` now and return its handle, for ``join``."""
        spec = self.registry_spec(task)
        group = self._next_group(None)
        (handle,), _ = await children.start(
            self, group, [(spec, children.as_input(input))], step=None, concurrency=None
        )
        return handle

    async def join(
        self,
        handles: Sequence[children.ChildHandle],
        *,
        on_failure: children.OnFailure = "fail",
        max_failures: int | None = None,
    ) -> list[Any]:
        """The results of ``handles``' children, in order, once every child this job started
        has ended (this job waits for them holding no worker, as in ``map``)."""
        return await children.join(self, handles, children.tolerance(on_failure, max_failures))

    def registry_spec(self, task: str | TaskSpec) -> TaskSpec:
        if isinstance(task, TaskSpec):
            return task
        spec = self.registry_task(task)
        if spec is None:
            raise ValueError(f"no task named {task!r} to start as a child job")
        return spec

    def registry_task(self, name: str) -> TaskSpec | None:
        return None if self.registry is None else self.registry.get_task(name)

    def child_budget(self, count: int) -> float | None:
        """Each of ``count`` new children's budget: an equal share of what this job's budget
        has left, so the tree together never spends past it."""
        if self.budget is None:
            return None
        return max(0.0, self.budget - self.cost - self._reserved) / max(1, count)

    def _next_group(self, step: str | None) -> str:
        self._fanouts += 1
        return f"{step or ''}#{self._fanouts}"

    @asynccontextmanager
    async def reserve_budget(self, estimate: float) -> AsyncIterator[None]:
        """Refuse a call whose least cost would take the job past its budget; hold its estimate
        while it runs, so calls made at once cannot overspend together."""
        if self.budget is not None and self.cost + self._reserved + estimate > self.budget + 1e-9:
            raise BudgetExceeded(self.cost + self._reserved, estimate, self.budget)
        self._reserved += estimate
        try:
            yield
        finally:
            self._reserved -= estimate

    async def record_llm_usage(self, usage: Usage, cost: float, model: str) -> str | None:
        """Account for one answered LLM call: a ``log`` event with its ``usage``, and the job's
        ``usage`` and ``cost`` totals in the same append (so the record always shows the
        spending so far, even if the step fails later). Returns the event's id."""
        self.usage = self.usage.plus(usage)
        self.cost = round(self.cost + cost, 9)
        if self.current_step is not None:
            self._step_usage = (self._step_usage or Usage()).plus(usage)
        return await self._emit(
            EventType.log,
            {
                "level": "info",
                "message": f"LLM call to {model}: {usage.input_tokens} tokens in, "
                f"{usage.output_tokens} out, {usage.duration_ms / 1000:.2f}s, cost {cost:.6g}",
                "usage": {**usage.model_dump(), "cost": cost, "model": model},
            },
            {"usage": self.usage.model_dump(), "cost": self.cost},
        )

    # -- internals ------------------------------------------------------------------------

    def _ref(self, name: str) -> StepRef:
        return StepRef(index=self.spec.step_index(name), count=len(self.spec.steps), name=name)

    def _start_step_span(self, ref: StepRef, state: str) -> tracing.Span:
        # A step whose failure the task caught and went on from ends where the next begins.
        self._step_span.end()
        self._step_span = tracing.start_span(
            f"step {ref.name}",
            {
                "stepstream.step.index": ref.index,
                "stepstream.step.name": ref.name,
                "stepstream.step.state": state,
            },
        )
        return self._step_span

    def _step_failed(self, exc: BaseException) -> None:
        """The step's block raised: its span stays open until the runtime's event (``retrying``,
        ``failed``, ``waiting``...) or the next step ends it."""
        if isinstance(exc, Exception):
            self._step_span.fail(exc)
            self._step_span.set({"stepstream.step.state": "failed"})

    def end_step_span(self, event_id: str | None) -> None:
        """End the span of a step the run stopped in, with the runtime's event that ended it."""
        self._step_span.end(event_id)

    async def _begin_step(self, ref: StepRef) -> None:
        self._start_step_span(ref, "running")
        self.current_step = ref
        self._step_usage = None
        self._step_text = None
        self.steps[ref.index - 1] = StepRecord(
            index=ref.index, name=ref.name, state="running", started_at=utcnow()
        )
        await self._emit(
            EventType.step,
            {"step": ref.model_dump()},
            {
                "step": ref.model_dump(),
                "steps": self._steps_json(),
                "progress": round((ref.index - 1) / ref.count, 4),
                "message": None,
            },
            # The text key holds the latest begun step's text: a step starts without any.
            then=[Command("DEL", [self.store.keys.job_text(self.job_id)])],
        )

    async def _complete_step(
        self, ref: StepRef, started: float, output: Any, value: Any = None
    ) -> None:
        text = await self._end_text()
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        record = self.steps[ref.index - 1]
        record.text = text
        record.state = "completed"
        record.finished_at = utcnow()
        record.duration_ms = duration_ms
        record.output = output
        record.value = value
        data: dict[str, Any] = {"step": ref.model_dump(), "duration_ms": duration_ms}
        if output is not None:
            data["output"] = output
        if self._step_usage is not None:  # the LLM calls made inside the step
            record.usage = self._step_usage
            data["usage"] = self._step_usage.model_dump()
            self._step_usage = None
        event_id = await self._emit(
            EventType.step_completed,
            data,
            {"steps": self._steps_json(), "progress": round(ref.index / ref.count, 4)},
            # Its text is in `steps` now.
            then=[Command("DEL", [self.store.keys.job_text(self.job_id)])]
            if text is not None
            else (),
        )
        self._step_span.set({"stepstream.step.state": "completed"})
        self._step_span.end(event_id)
        # Between steps no step is current: a failure there must not blame the finished one.
        self.current_step = None

    async def _restore_step(self, ref: StepRef, done: StepRecord) -> None:
        # Not run again: its span is an instant, marked as the stored value.
        span = self._start_step_span(ref, "restored")
        span.set({"stepstream.step.stored": True})
        self.current_step = ref
        done.state = "restored"
        data: dict[str, Any] = {
            "step": ref.model_dump(),
            "duration_ms": 0.0,
            "restored": True,
        }
        if done.output is not None:
            data["output"] = done.output
        span.end(
            await self._emit(
                EventType.step_completed,
                data,
                {
                    "step": ref.model_dump(),
                    "steps": self._steps_json(),
                    "progress": round(ref.index / ref.count, 4),
                },
            )
        )

    def mark_interrupted_step(self, state: str) -> dict[str, Any]:
        """Record fields that mark the running step as failed or cancelled (for the runtime)."""
        if self.current_step is not None:
            record = self.steps[self.current_step.index - 1]
            if record.state == "running":
                record.state = state
                self._step_span.set({"stepstream.step.state": state})
                record.finished_at = utcnow()
                record.usage = self._step_usage  # what the failed step spent, for the record
                if self._step_text is not None:  # what reached the log, not what waited
                    self._step_text.discard()
                    record.text = self._step_text.text or None
        # The spending totals too: a call's own append may have been refused (a cancel).
        return {"steps": self._steps_json(), "usage": self.usage.model_dump(), "cost": self.cost}

    async def _end_text(self) -> str | None:
        """The current step's text, all of it stored (None when it wrote none)."""
        step_text, self._step_text = self._step_text, None
        if step_text is None:
            return None
        await step_text.flush()
        return step_text.text or None

    async def _emit_output(self, delta: str, offset: int) -> None:
        ref = self.current_step
        if ref is None:  # the step ended under a late timer: its text is folded already
            return
        key = self.store.keys.job_text(self.job_id)
        ttl = self.store.settings.retention_seconds
        await self._emit(
            EventType.output,
            {"step": ref.model_dump(), "text": delta, "offset": offset},
            {},
            wait=False,
            then=text_commands(key, ref.index, delta, offset, ttl),
        )

    def _steps_json(self) -> list[dict[str, Any]]:
        return [s.model_dump(mode="json") for s in self.steps]

    async def _emit(
        self,
        type_: EventType,
        data: dict[str, Any],
        fields: dict[str, Any],
        *,
        wait: bool = True,
        then: Sequence[Command] = (),
    ) -> str | None:
        """Write one event; its id in the log when ``wait`` (the store's answer)."""
        event = new_event(self.job_id, type_.value, self.attempt, **data)
        return await self.writer.write(event, fields, wait=wait, then=then)
