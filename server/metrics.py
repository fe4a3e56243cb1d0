"""``GET /metrics`` in the Prometheus text format, and the request hooks that feed it.

Two kinds of series, and each scrape of a web process returns both:

- **Cluster-wide** (``stepstream_jobs_*``, ``stepstream_job_duration_seconds``,
  ``stepstream_queue_*``, ``stepstream_workers_alive``): read from Redis at scrape time. Every
  state transition is counted by the job store's append script as it is written, whichever
  process writes it (tasks/transitions.py); workers, which have no HTTP port, add the run times
  (``tasks/heartbeat.py``). Every web process reports the same values: aggregate them with
  ``max`` (or scrape one), never ``sum``.
- **Per process** (``stepstream_sse_*``, ``stepstream_redis_reconnects_total``,
  ``stepstream_hub_connected``, ``process_*``): this web process's streams and hub. Sum them
  over the web processes.

The hooks wrap single routes rather than the whole app, so no other request pays for them:
delivered events are counted by counting frames as the SSE responses send them, and every
request about a job tags its log lines with the job id.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stepstream.server.handoff import handoff
from stepstream.server.health import read_queue
from stepstream.server.state import AppState
from stepstream.server.traces import frames_in
from stepstream.tasks import heartbeat, logs, transitions
from stepstream.tasks.models import JobState

_HELP = {
    "submitted": "Jobs created, by any path: the API, a batch, a recurring tick (from Redis).",
    "started": "Runs begun: a job moved to running (a batch's parent at its creation).",
    "retried": "Attempts followed by another: a job moved to retrying (read from Redis).",
    "waiting": "Jobs that began waiting for human input (read from Redis).",
    "completed": "Jobs that completed (read from Redis).",
    "failed": "Jobs that failed for good, after their last attempt (read from Redis).",
    "cancelled": "Jobs cancelled, before they started or while running (read from Redis).",
}


class _Families(Collector):
    """Metric families prepared for one scrape (Redis is async, collectors are not)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class WebMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.events_delivered = Counter(
            "stepstream_sse_events_delivered",
            "SSE events sent to clients by this web process (job streams and the firehose).",
            ["stream"],
            registry=self.registry,
        )
        self._scrape = _Families()
        self.registry.register(self._scrape)

    # -- the endpoint ---------------------------------------------------------------------

    async def endpoint(self, request: Request) -> Response:
        state: AppState = request.app.state.stepstream
        written, state.hub.frames_written_directly = state.hub.frames_written_directly, 0
        if written:
            self.events_delivered.labels("job").inc(written)
        families = await self._cluster(state) + self._process(state)
        # No await between these two lines: a concurrent scrape cannot swap the families.
        self._scrape.families = families
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def _cluster(self, state: AppState) -> list[Metric]:
        store = state.store
        counters = await heartbeat.read_counters(store.redis, store.keys)
        queue = await read_queue(store)
        workers = await heartbeat.read_workers(store.queue, store.keys)
        out: list[Metric] = []
        for kind in transitions.COUNTERS:
            family = CounterMetricFamily(f"stepstream_jobs_{kind}", _HELP[kind], labels=["task"])
            for task in sorted(counters.by_task):
                if kind in counters.by_task[task]:
                    family.add_metric([task], counters.by_task[task][kind])
            out.append(family)
        hist = HistogramMetricFamily(
            "stepstream_job_duration_seconds",
            "Time from a job's first start to its end, by outcome (read from Redis).",
            labels=["task", "outcome"],
        )
        for (task, outcome), h in sorted(counters.durations.items()):
            hist.add_metric([task, outcome], buckets=h.cumulative(), sum_value=h.sum)
        out.append(hist)
        jobs = GaugeMetricFamily(
            "stepstream_jobs",
            "Jobs not finished, by task and state (from a bounded scan of the arq queue).",
            labels=["task", "state"],
        )
        for task, by_state in sorted(queue.active.items()):
            for job_state in JobState:
                if not job_state.terminal:
                    jobs.add_metric([task, job_state.value], by_state.get(job_state.value, 0))
        out.append(jobs)
        out.append(
            GaugeMetricFamily(
                "stepstream_queue_depth",
                "Jobs waiting for a worker (queued or retrying).",
                value=queue.depth,
            )
        )
        out.append(
            GaugeMetricFamily(
                "stepstream_queue_oldest_age_seconds",
                "How long the longest-waiting runnable job has waited for a worker.",
                value=queue.oldest or 0.0,
            )
        )
        out.append(
            GaugeMetricFamily(
                "stepstream_workers_alive",
                "Workers whose heartbeat has not expired.",
                value=len(workers),
            )
        )
        out.append(
            GaugeMetricFamily(
                "stepstream_worker_running_jobs",
                "Jobs running on the live workers, from their heartbeats.",
                value=sum(len(w.get("running", [])) for w in workers),
            )
        )
        return out

    def _process(self, state: AppState) -> list[Metric]:
        hub = state.hub
        refused = CounterMetricFamily(
            "stepstream_sse_streams_refused",
            "Streams this web process refused with 429, by the limit (key, token, process).",
            labels=["per"],
        )
        for per in ("key", "token", "process"):
            refused.add_metric([per], state.streams_refused[per])
        return [
            GaugeMetricFamily(
                "stepstream_sse_streams_open",
                "SSE streams open on this web process.",
                value=hub.subscriber_count,
            ),
            CounterMetricFamily(
                "stepstream_sse_streams_accepted",
                "Streams this web process accepted, each given a slot (its rate: connects/s).",
                value=state.streams_accepted,
            ),
            refused,
            CounterMetricFamily(
                "stepstream_sse_slow_consumers_dropped",
                "Streams this web process cut off because the client fell behind.",
                value=hub.dropped_slow,
            ),
            CounterMetricFamily(
                "stepstream_redis_reconnects",
                "Times a pub/sub connection of this web process to Redis came back after a loss "
                "(on a cluster: on whichever node serves its channels then).",
                value=hub.reconnects,
            ),
            GaugeMetricFamily(
                "stepstream_hub_connected",
                "1 while this web process's pub/sub connections to Redis are up.",
                value=1 if hub.connected.is_set() else 0,
            ),
        ]

    # -- the hooks ------------------------------------------------------------------------

    def instrument(self, routes: Sequence[BaseRoute]) -> list[BaseRoute]:
        """Wrap the routes whose requests feed the metrics and the logs."""
        for route in routes:
            if not isinstance(route, Route):
                continue
            if route.path == "/api/jobs/{job_id}/events":
                route.app = _CountFrames(route.app, self.events_delivered.labels("job"))
            elif route.path == "/api/events":
                route.app = _CountFrames(route.app, self.events_delivered.labels("firehose"))
            if "{job_id}" in route.path:
                route.app = _BindJob(route.app)
        return list(routes)


class _BindJob:
    """Tags every log line written while serving a request about one job with its id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        job_id = scope.get("path_params", {}).get("job_id")
        if not isinstance(job_id, str):
            await self.app(scope, receive, send)
            return
        with logs.bound_job(job_id):
            await self.app(scope, receive, send)


class _CountFrames:
    """Counts the SSE events a stream sends (``frames_in``)."""

    def __init__(self, app: ASGIApp, counter: Any) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        taker = handoff(scope)
        if taker is not None:  # the body is sent past this layer: the handoff counts it
            taker.counter = self.counter
            await self.app(scope, receive, send)
            return

        async def counting(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body":
                frames = frames_in(message.get("body", b""))
                if frames:
                    self.counter.inc(frames)

        await self.app(scope, receive, counting)
