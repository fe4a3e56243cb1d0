"""Logging for the web and worker processes: JSON lines for machines, plain lines for people.

``setup_logging`` picks the format from ``STEPSTREAM_LOG_FORMAT``: ``json``, ``text``, or
``auto`` (the default: JSON when stderr is not a terminal, so a process under systemd, Docker
or a Procfile runner writes one JSON object a line, and a person at a terminal reads text).

Every line written while a job runs carries ``job_id``, ``task``, ``attempt`` and ``step``:
the runtime binds them to a context variable at the start of the job (each arq job runs in its
own asyncio task, so the binding never leaks into another job). arq's own lines name the job
only in their message; a filter on arq's logger adds ``job_id`` to them too.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import unquote_plus

from stepstream.tasks import tracing
from stepstream.tasks.settings import Settings


class _HasStep(Protocol):
    @property
    def current_step(self) -> Any: ...


@dataclass(slots=True)  # one per stream, held for its life
class JobLogContext:
    job_id: str
    task: str | None = None
    attempt: int | None = None
    # The task context, read when a line is written: the step changes while the job runs.
    source: _HasStep | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job_id": self.job_id}
        if self.task is not None:
            out["task"] = self.task
        if self.attempt is not None:
            out["attempt"] = self.attempt
        step = getattr(self.source, "current_step", None) if self.source is not None else None
        if step is not None:
            out["step"] = getattr(step, "name", None)
            out["step_index"] = getattr(step, "index", None)
        return out


_job: ContextVar[JobLogContext | None] = ContextVar("stepstream_job", default=None)


def bind_job(
    job_id: str,
    task: str | None = None,
    attempt: int | None = None,
    source: _HasStep | None = None,
) -> JobLogContext:
    """Tag every line written from now on in this asyncio task (and tasks it starts)."""
    ctx = JobLogContext(job_id, task, attempt, source)
    _job.set(ctx)
    return ctx


@contextmanager
def bound_job(job_id: str, task: str | None = None) -> Iterator[JobLogContext]:
    """Tag the lines written inside the block (a web request about one job)."""
    token = tag_job(job_id, task)
    ctx = _job.get()
    assert ctx is not None
    try:
        yield ctx
    finally:
        untag_job(token)


def tag_job(job_id: str, task: str | None = None) -> Token[JobLogContext | None]:
    """``bound_job`` without a block, for a coroutine that must not keep a generator
    suspended (an SSE stream's): ``untag_job`` ends it."""
    return _job.set(JobLogContext(job_id, task))


def untag_job(token: Token[JobLogContext | None]) -> None:
    _job.reset(token)


def current_job() -> JobLogContext | None:
    return _job.get()


# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is kept.
# uvicorn adds ``color_message`` (its message with terminal colours) to some lines.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
_OWN = {"job_id", "task", "attempt", "step", "step_index", "process_kind"}


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    ctx = _job.get()
    if ctx is not None:
        fields.update(ctx.fields())
    fields.update(tracing.log_ids())  # trace_id, span_id: the line's place in its trace
    for name, value in record.__dict__.items():
        if name not in _STANDARD and not name.startswith("_"):
            fields[name] = value  # extra=..., and job_id that the arq filter found
    return fields


# json.dumps(out, default=str, ensure_ascii=False), with one encoder for the process.
_encode_line = json.JSONEncoder(default=str, ensure_ascii=False).encode


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, process, pid, msg, job fields, extras."""

    def __init__(self, process_kind: str) -> None:
        super().__init__()
        self.process_kind = process_kind

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": self.process_kind,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        out.update(_record_fields(record))
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exc"] = record.exc_text
        return _encode_line(out)


# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: a newline in
# a task's error message would start a line of its own, a carriage return or an escape
# sequence would overwrite or recolour what a terminal shows.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_NAMES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` on one line: each control character as its escape (``\\n``, ``\\x1b``), as
    the JSON format writes them."""
    return _CONTROL.sub(_escape_control, text)


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    named = _CONTROL_NAMES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


class TextFormatter(logging.Formatter):
    """``12:00:01 INFO stepstream.worker: job completed [job_id=… task=… attempt=1 step=…]``.

    One record, one line: its message and tags come with control characters escaped, so no
    text from a task can forge a line. A traceback follows on lines of its own, each indented:
    a line that starts at the margin is always a log line.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        fields = _record_fields(record)
        tags = " ".join(
            f"{k}={escape_controls(str(v))}" for k, v in fields.items() if v is not None
        )
        if tags:
            line = f"{line} [{tags}]"
        below = [self.formatException(record.exc_info)] if record.exc_info else []
        if not record.exc_info and record.exc_text:
            below.append(record.exc_text)
        if record.stack_info:
            below.append(self.formatStack(record.stack_info))
        for block in below:
            for text in block.splitlines():
                line += "\n    " + escape_controls(text)
        return line


# arq's job lines: "  0.52s → <job id>:stepstream.run_job(...)", "job <job id> expired", …
_ARQ_REF = re.compile(r"^([A-Za-z0-9_-]{1,64}):[\w.]+$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _arq_job_id(record: logging.LogRecord) -> str | None:
    args = record.args if isinstance(record.args, tuple) else ()
    strings = [a for a in args if isinstance(a, str)]
    for value in strings:
        match = _ARQ_REF.match(value)
        if match:
            return match.group(1)
    template = str(record.msg)
    if strings and ("job %s" in template or "%s:%s" in template) and _JOB_ID.match(strings[0]):
        return strings[0]
    return None


class _AdoptArq(logging.Filter):
    """Writes arq's records through our handler, with the job id arq put in the message.

    arq's CLI configures its own text handler on the ``arq`` logger after it imports
    ``WorkerSettings`` (our setup runs as that class is built). ``dictConfig`` replaces a logger's
    handlers but keeps its filters, so this filter, on each of arq's loggers, sees every arq
    record: it hands the record to our handler and stops it before arq's handler.
    """

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None and _job.get() is None:
            job_id = _arq_job_id(record)
            if job_id is not None:
                record.job_id = job_id
        if record.levelno >= self.handler.level:
            self.handler.handle(record)
        return False


def use_json(setting: str, stream: Any = None) -> bool:
    setting = setting.lower()
    if setting == "json":
        return True
    if setting == "text":
        return False
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty())


ARQ_LOGGERS = ("arq", "arq.worker", "arq.jobs", "arq.connections", "arq.utils")
# A query parameter as an access line shows it, still percent-encoded: name=value.
_QUERY_PARAM = re.compile(r"([?&])([^?&=\s\"'#]*)=([^&\s\"'#]*)")


def redact_tokens(text: str) -> str:
    """``?token=<stream token>`` becomes ``?token=[redacted]``: a token in a log is a key to a
    stream for anyone who reads the log. The name is matched as the server reads it, decoded:
    ``?%74oken=`` authenticates as ``?token=`` does, so it is redacted too."""
    return _QUERY_PARAM.sub(_redact_param, text)


def _redact_param(match: re.Match[str]) -> str:
    if unquote_plus(match.group(2)).strip().lower() != "token":
        return match.group()
    return f"{match.group(1)}{match.group(2)}=[redacted]"


class TokenRedactor(logging.Filter):
    """Redacts stream tokens in a record's message and arguments (uvicorn's access lines carry
    the whole query string). On a handler, it covers every line the handler writes; a host
    app that mounts Stepstream can add it to its own access-log handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Any text with a query string: the parameter's name may be percent-encoded.
        if isinstance(record.msg, str) and "=" in record.msg:
            record.msg = redact_tokens(record.msg)
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and "=" in arg for arg in record.args
        ):
            record.args = tuple(
                redact_tokens(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


_installed: list[tuple[logging.Logger, logging.Handler | logging.Filter]] = []


def setup_logging(process_kind: str, settings: Settings) -> logging.Handler:
    """Install one stderr handler on the root logger; route uvicorn's and arq's lines to it.

    Calling it again replaces what an earlier call installed and nothing else, so handlers
    that others added (pytest's, an embedding application's) stay.
    """
    for logger, item in _installed:
        if isinstance(item, logging.Handler):
            logger.removeHandler(item)
        else:
            logger.removeFilter(item)
    _installed.clear()

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TokenRedactor())
    handler.setFormatter(
        JsonFormatter(process_kind) if use_json(settings.log_format) else TextFormatter()
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    _installed.append((root, handler))

    # uvicorn configured its loggers before it loaded the app: send their lines through ours
    # so one process writes one format. Their levels (--log-level) stay as uvicorn set them.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True

    # A logger's filters see only the records created on that logger, not its children's.
    # httpx logs every request at INFO (webhook deliveries, LLM calls): our own lines say what
    # matters, so it speaks only about problems.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))

    arq_filter = _AdoptArq(handler)
    for name in ARQ_LOGGERS:
        arq_logger = logging.getLogger(name)
        arq_logger.addFilter(arq_filter)
        _installed.append((arq_logger, arq_filter))
    return handler
