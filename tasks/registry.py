"""The ``@task`` decorator and :class:`TaskRegistry`, the tasks a deployment serves.

``@task`` and ``recurring(...)`` declare into :data:`default_registry`, which the configured
task modules fill as they are imported (``load_tasks``). An app or a worker holds the registry
it serves (``create_app(registry=...)``, ``worker_settings(settings, registry=...)``), so one
process can serve two registries; with none given it is the default one.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, RootModel

from stepstream._backoff import Backoff as Backoff  # public here: stepstream.Backoff
from stepstream.tasks.cost import FREE, Pricing
from stepstream.tasks.errors import ConfigurationError

if TYPE_CHECKING:
    from stepstream.tasks.context import TaskContext
    from stepstream.tasks.recurring import Recurring

TaskFunction = Callable[["TaskContext", Any], Awaitable[Any]]

BUILTIN_TASK_MODULES = ("stepstream.tasks.demo",)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    fn: TaskFunction
    steps: tuple[str, ...]
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    title: str
    description: str
    max_attempts: int = 3
    timeout: float = 600.0
    retry_timeouts: bool = True
    concurrency: int | None = None  # jobs of this task running at once, across all workers
    backoff: Backoff = field(default_factory=Backoff)
    sample_input: dict[str, Any] | None = None
    # AI workloads (docs/ai-workloads.md)
    pricing: Pricing = FREE  # what one LLM call of this task costs
    budget: float | None = None  # the default most a job may spend (the submit body may set it)
    cache_ttl: float | None = None  # seconds a result is reused for the same input
    model: str | None = None  # the LLM model, when not the configured STEPSTREAM_LLM_MODEL

    def step_index(self, name: str) -> int:
        """1-based index of a declared step."""
        try:
            return self.steps.index(name) + 1
        except ValueError:
            raise KeyError(f"task {self.name!r} declares no step {name!r}") from None

    def check_input(self, raw_input: dict[str, Any]) -> None:
        """Validate an input as a job of this task is submitted with it: ValidationError, one
        ``extra_forbidden`` error per field the input model does not declare, unless the model
        accepts them (``submitted_input_model``)."""
        submitted_input_model(self.input_model).model_validate(raw_input)


@functools.cache
def submitted_input_model(model: type[BaseModel]) -> type[BaseModel]:
    """``model`` as submissions and answers to ``wait_for_input`` are checked against it: a
    field it does not declare is refused (a misspelt ``{"reveiw": true}`` would otherwise run
    as if absent, and an answer could carry anything along). A model that sets
    ``model_config["extra"]`` itself (``ConfigDict(extra="allow")``, or ``"ignore"``) is taken
    at its word. Only the top level is checked so: nested models keep their own setting. The
    worker validates with ``model`` itself, so jobs stored before still run."""
    if "extra" in model.model_config or issubclass(model, RootModel):
        return model
    namespace = {
        "__module__": model.__module__,
        "__qualname__": model.__qualname__,
        "__doc__": model.__doc__,
        "model_config": ConfigDict(extra="forbid"),
    }
    return type(model.__name__, (model,), namespace)


class TaskRegistry:
    """Declared tasks by name, and the recurring jobs declared on them."""

    def __init__(self, tasks: Iterable[TaskSpec] = (), recurring: Iterable[Recurring] = ()) -> None:
        self._tasks: dict[str, TaskSpec] = {}
        self._recurring: dict[str, Recurring] = {}
        for spec in tasks:
            self.add_task(spec)
        for entry in recurring:
            self.add_recurring(entry)

    def add_task(self, spec: TaskSpec) -> None:
        # The same function again is a module imported twice (as a script and by name, say).
        held = self._tasks.get(spec.name)
        if held is not None and held.fn is not spec.fn:
            raise ValueError(f"task {spec.name!r} is declared twice")
        self._tasks[spec.name] = spec

    def add_recurring(self, entry: Recurring) -> None:
        held = self._recurring.get(entry.name)
        if held is not None and held != entry:
            raise ValueError(f"recurring job {entry.name!r} is declared twice")
        self._recurring[entry.name] = entry

    def get_task(self, name: str) -> TaskSpec | None:
        return self._tasks.get(name)

    def tasks(self) -> list[TaskSpec]:
        return sorted(self._tasks.values(), key=lambda spec: spec.name)

    def recurring_jobs(self) -> list[Recurring]:
        return sorted(self._recurring.values(), key=lambda entry: entry.name)

    def __repr__(self) -> str:
        return f"TaskRegistry(tasks={sorted(self._tasks)}, recurring={sorted(self._recurring)})"


default_registry = TaskRegistry()


def task(
    name: str,
    *,
    steps: list[str] | tuple[str, ...],
    input: type[BaseModel],
    output: type[BaseModel],
    title: str | None = None,
    description: str = "",
    max_attempts: int = 3,
    timeout: float = 600.0,
    retry_timeouts: bool = True,
    concurrency: int | None = None,
    backoff: Backoff | None = None,
    sample_input: dict[str, Any] | None = None,
    pricing: Pricing | None = None,
    budget: float | None = None,
    cache_ttl: float | None = None,
    model: str | None = None,
    registry: TaskRegistry | None = None,
) -> Callable[[TaskFunction], TaskFunction]:
    """Declare a task: a typed async function run step by step by the worker. It goes into
    ``registry``, :data:`default_registry` unless given."""
    if not steps:
        raise ValueError(f"task {name!r} declares no steps")
    if len(set(steps)) != len(steps):
        raise ValueError(f"task {name!r} declares a step twice")
    target = default_registry if registry is None else registry

    def register(fn: TaskFunction) -> TaskFunction:
        target.add_task(
            TaskSpec(
                name=name,
                fn=fn,
                steps=tuple(steps),
                input_model=input,
                output_model=output,
                title=title or name.replace("_", " ").capitalize(),
                description=description or (fn.__doc__ or "").strip(),
                max_attempts=max_attempts,
                timeout=timeout,
                retry_timeouts=retry_timeouts,
                concurrency=concurrency,
                backoff=backoff or Backoff(),
                sample_input=sample_input,
                pricing=pricing or FREE,
                budget=budget,
                cache_ttl=cache_ttl,
                model=model,
            )
        )
        return fn

    return register


def load_tasks(modules: list[str], *, demo: bool = True) -> TaskRegistry:
    """Import the modules whose ``@task`` declarations fill :data:`default_registry`, and
    return it."""
    for module in (*(BUILTIN_TASK_MODULES if demo else ()), *modules):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise  # the module exists; something it imports does not
            raise ConfigurationError(
                f"STEPSTREAM_TASK_MODULES names {module!r}, which cannot be imported from "
                f"{Path.cwd()} (is it on PYTHONPATH, or in the directory you start from?)"
            ) from None
    return default_registry
