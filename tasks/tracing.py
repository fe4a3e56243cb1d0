"""One trace per job, with OpenTelemetry (docs/observability.md).

The rest of Stepstream calls this module only: ``start_span`` and the :class:`Span` it returns,
``add_event`` on the current span, ``log_ids`` for the log lines. Tracing is on when
``STEPSTREAM_TRACING`` is ``on``, or, at its default ``auto``, when the standard ``OTEL_*``
variables name an exporter (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_TRACES_EXPORTER``) or the
application has set a global tracer provider of its own before Stepstream's first span.

Off (or with the ``otel`` extra not installed) it costs one boolean test per call site:
nothing imports ``opentelemetry`` and every span is the one :data:`NO_SPAN`, whose methods do
nothing. On, an application's own tracer provider is used as it is; without one, an SDK
provider is installed whose sampler, batch processor and OTLP/HTTP exporter read the standard
variables themselves (``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_SCHEDULE_DELAY``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``...).

A job's trace lives in its record as a W3C carrier (``traceparent``, ``tracestate``): the
submit span's context. Every attempt starts as a child of it, on whichever worker and however
long after, so one trace holds the whole job, and the sampling decision made at submit (the
carrier's flags) holds for all of it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

logger = logging.getLogger("stepstream.tracing")

Carrier = dict[str, str]  # traceparent (and tracestate) of a span, as W3C headers carry them
Attributes = Mapping[str, str | bool | int | float | None]
CARRIER_HEADERS = ("traceparent", "tracestate")
_MAX_HEADER = 512  # a longer traceparent or tracestate is not one (W3C: 55 and 512 characters)
_TRACER_NAME = "stepstream"


class Span:
    """A span of Stepstream's: the no-op one (tracing off) and the base of the real one."""

    __slots__ = ()

    def set(self, attributes: Attributes) -> None:
        """Set attributes (None values are left out)."""

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        """Add a span event, such as ``retrying`` or ``waiting``."""

    def fail(self, exc: BaseException) -> None:
        """Mark the span as failed with ``exc``: its status, ``error.type`` and the exception."""

    def end(self, event_id: str | None = None) -> None:
        """End the span; ``event_id``: the job's log event that ended it."""

    def carrier(self) -> Carrier | None:
        """This span's context as W3C headers (None when off)."""
        return None

    def current(self) -> Any:
        """A context manager in which this span is the current one (children, log lines)."""
        return nullcontext()

    @property
    def ended(self) -> bool:
        return True


NO_SPAN = Span()


class _Real(Span):
    __slots__ = ("_ended", "_span")

    def __init__(self, span: Any) -> None:
        self._span = span
        self._ended = False

    def set(self, attributes: Attributes) -> None:
        self._span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        clean = {k: v for k, v in (attributes or {}).items() if v is not None}
        self._span.add_event(name, clean)

    def fail(self, exc: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("error.type", type(exc).__name__)
        self._span.record_exception(exc)
        self._span.set_status(Status(StatusCode.ERROR, str(exc)[:200] or type(exc).__name__))

    def end(self, event_id: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        if event_id is not None:
            self._span.set_attribute("stepstream.event_id", event_id)
        self._span.end()

    def carrier(self) -> Carrier | None:
        from opentelemetry.trace import set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: Carrier = {}
        TraceContextTextMapPropagator().inject(carrier, set_span_in_context(self._span))
        return carrier or None

    @contextmanager
    def current(self) -> Iterator[None]:
        from opentelemetry import context
        from opentelemetry.trace import set_span_in_context

        token = context.attach(set_span_in_context(self._span))
        try:
            yield
        finally:
            context.detach(token)

    @property
    def ended(self) -> bool:
        return self._ended


class _State:
    """Whether tracing is on, decided once (at the first span, or by ``configure``)."""

    mode: str | None = None  # STEPSTREAM_TRACING, from the settings (configure) or the env
    service = "stepstream"  # the service name unless OTEL_SERVICE_NAME says otherwise
    decided: bool | None = None
    tracer: Any = None


def configure(mode: str, service: str) -> None:
    """Called once by the web process and the worker at start: the setting and which process
    this is. Decides nothing yet: an application may set up its tracer provider later."""
    _State.mode = mode.lower()
    _State.service = service
    _State.decided = None


def enabled() -> bool:
    """True when spans are made. Imports ``opentelemetry`` only when the answer is yes."""
    if _State.decided is None:
        _State.decided = _decide()
    return _State.decided


def _asked_by_environment() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _application_provider() -> bool:
    """The application has imported OpenTelemetry and set a tracer provider of its own."""
    if "opentelemetry.trace" not in sys.modules:
        return False
    from opentelemetry import trace

    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _decide() -> bool:
    mode = (_State.mode or os.environ.get("STEPSTREAM_TRACING", "auto")).strip().lower()
    if mode == "off" or (
        mode != "on" and not _asked_by_environment() and not _application_provider()
    ):
        return False
    try:
        _State.tracer = _install()
    except ImportError as exc:
        logger.warning(
            "tracing is asked for but OpenTelemetry is not installed (%s): "
            'pip install "stepstream[otel]"',
            exc,
        )
        return False
    return True


def _install() -> Any:
    from opentelemetry import trace

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: _State.service}
        # The sampler (OTEL_TRACES_SAMPLER) and the processor's timings come from the environment.
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(_exporter()))
        trace.set_tracer_provider(provider)
        logger.info("tracing on: spans go to %s", _destination())
    return trace.get_tracer(_TRACER_NAME)


def _exporter() -> Any:
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*


def _destination() -> str:
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or "http://localhost:4318"
    )


def incoming(headers: Mapping[str, str]) -> Carrier | None:
    """The W3C trace headers of a request, as a carrier for ``start_span(parent=...)``; plain
    strings, so the HTTP layer reads them without OpenTelemetry."""
    carrier = {
        name: value
        for name in CARRIER_HEADERS
        if (value := headers.get(name)) is not None and len(value) <= _MAX_HEADER
    }
    return carrier if "traceparent" in carrier else None


def start_span(
    name: str,
    attributes: Attributes | None = None,
    *,
    parent: Carrier | None = None,
    kind: str = "internal",
) -> Span:
    """A new span, child of the current span if there is one, else of ``parent`` (a stored or
    received carrier), else the root of a new trace. NO_SPAN when tracing is off."""
    if not enabled():
        return NO_SPAN
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = None
    if parent is not None and not trace.get_current_span().get_span_context().is_valid:
        context = TraceContextTextMapPropagator().extract(parent)
    span = _State.tracer.start_span(
        name,
        context=context,
        kind=getattr(trace.SpanKind, kind.upper()),
        attributes={k: v for k, v in (attributes or {}).items() if v is not None},
    )
    return _Real(span)


def add_event(name: str, attributes: Attributes | None = None) -> None:
    """An event on the current span (a model call's retry-after wait), when tracing is on."""
    if not enabled():
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, {k: v for k, v in (attributes or {}).items() if v is not None})


def rename_current(name: str, attributes: Attributes | None = None) -> None:
    """Name the current span (a request's, once its route is known)."""
    if not enabled():
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.update_name(name)
    annotate_current(attributes or {})


def annotate_current(attributes: Attributes) -> None:
    """Set attributes on the current span, when tracing is on."""
    if not enabled():
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


def log_ids() -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the current span, for a log line; {} when none."""
    if not _State.decided:  # tracing off, or no span made yet in this process
        return {}
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
