"""Configuration, read from the environment (every setting in docs/configuration.md)."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal, cast
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
WEBHOOK_EVENTS = frozenset({"completed", "failed", "cancelled"})


def _comma_separated(value: object) -> object:
    """``"a, b,,c"`` as ``["a", "b", "c"]``; a list (a Settings built in code) as it is."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# A list setting, written in the environment as ``a,b,c``. NoDecode: pydantic-settings would
# read the value as JSON (``["a","b"]``), which is not the documented format.
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_comma_separated)]


def _address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a pair."""
    host, colon, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port (e.g. 10.0.0.5:26379)")
    return host, int(port)


class _Environment(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEPSTREAM_", extra="ignore")


class StoreSettings(_Environment):
    """Redis, the job logs and the task modules: what every process reads."""

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "STEPSTREAM_REDIS_URL"),
    )
    # High availability (docs/deploy.md, "A Sentinel primary"): the Sentinels as
    # "host:port,host:port,..." and the name they monitor the primary under. With them set,
    # every client finds the primary through Sentinel, and REDIS_URL gives only its database,
    # username, password and TLS (rediss://).
    sentinels: Annotated[list[tuple[str, int]], NoDecode] = []
    sentinel_master: str = Field(default="", validate_default=True)
    # The log plane's cluster (docs/scaling.md): a seed node of a Valkey or Redis Cluster, as
    # redis://host:port (rediss:// for TLS). Set, job records, event logs and the firehose live
    # there; arq's queue stays on REDIS_URL (the queue plane).
    cluster_url: str = ""
    # The log plane's partitions on a cluster (docs/scaling.md): each a hash tag whose keys
    # live on one primary. 24 spreads evenly over 1, 2, 3, 4, 6, 8, 12 or 24 primaries. Fixed
    # for the life of a deployment's data: a job's partition is computed from its id.
    cluster_partitions: int = Field(default=24, ge=1, le=1024)
    prefix: str = "stepstream:"
    # Modules whose @task definitions the web process and the workers load (comma separated),
    # e.g. "tasks" for a tasks.py in the working directory, or "myapp.jobs".
    task_modules: CommaList = []
    # The two demo tasks (analyze_document, generate_quote). Unset, they load only when no task
    # module is named: a user's own modules come alone unless the demos are asked for too.
    demo_tasks: bool | None = None

    retention_seconds: int = 7 * 24 * 3600
    job_log_maxlen: int = 10_000
    firehose_maxlen: int = 100_000
    idempotency_ttl_seconds: int = 24 * 3600

    # Operations (docs/deploy.md)
    # JSON unless stderr is a terminal, for auto
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: str = "INFO"
    # OpenTelemetry (docs/observability.md): auto = on when OTEL_EXPORTER_OTLP_ENDPOINT or
    # OTEL_TRACES_EXPORTER is set, or the application set a tracer provider of its own.
    tracing: Literal["auto", "on", "off"] = "auto"

    @field_validator("sentinels", mode="before")
    @classmethod
    def _sentinel_addresses(cls, value: object) -> object:
        if not isinstance(value, str):
            return value  # already pairs (a Settings built in code)
        return [_address(part) for part in cast(list[str], _comma_separated(value))]

    @field_validator("cluster_url")
    @classmethod
    def _cluster_seeds(cls, value: str) -> str:
        """One seed node or several, comma-separated: the client needs one that answers."""
        seeds = [part.strip() for part in value.split(",") if part.strip()]
        for seed in seeds:
            parts = urlsplit(seed)
            if parts.scheme not in ("redis", "rediss") or not parts.hostname:
                raise ValueError(f"{seed!r} is not redis://host:port (or rediss:// for TLS)")
            if parts.path.strip("/") not in ("", "0"):
                # A cluster has one database; a URL naming another would be silently ignored.
                raise ValueError(
                    f"{seed!r} names database {parts.path.strip('/')}: a cluster has only 0"
                )
        if len({urlsplit(seed).scheme for seed in seeds}) > 1:
            # The nodes the client finds are reached as the first seed says: one scheme.
            raise ValueError(f"{value!r} mixes redis:// and rediss://: a cluster has one")
        return ",".join(seeds)

    @field_validator("sentinel_master")
    @classmethod
    def _sentinels_name_a_primary(cls, value: str, info: ValidationInfo) -> str:
        sentinels = info.data.get("sentinels")
        if sentinels is not None and bool(sentinels) != bool(value):
            raise ValueError(
                "STEPSTREAM_SENTINELS and STEPSTREAM_SENTINEL_MASTER go together: set both "
                "(the Sentinels, and the name they monitor the primary under) or neither"
            )
        return value

    @property
    def cluster_seeds(self) -> tuple[str, ...]:
        """``STEPSTREAM_CLUSTER_URL``'s seed nodes, in the order given."""
        return tuple(self.cluster_url.split(",")) if self.cluster_url else ()

    @property
    def redis_urls(self) -> tuple[str, ...]:
        """Every Redis server Stepstream connects to: never a webhook target."""
        return (self.redis_url, *self.cluster_seeds)

    @property
    def loads_demo_tasks(self) -> bool:
        """Whether the demo tasks load: as set, else only beside no task module of the user's."""
        return self.demo_tasks if self.demo_tasks is not None else not self.task_modules


class HttpSettings(_Environment):
    """The web process: requests, streams, access and the limits on what clients send."""

    max_body_bytes: int = 1_048_576
    body_timeout_seconds: float = 10.0  # a request body must arrive whole within this
    # A request's line and headers must arrive within this (stepstream web; server/protocol.py).
    header_timeout_seconds: float = 10.0
    # ...and be at most this large (431 past it). 64 KiB: far above any head a browser or a
    # script sends (nginx's default takes at most 32 KiB), and small enough that every open
    # connection may hold one.
    max_header_bytes: int = Field(default=65_536, ge=1_024)
    # Once its body is in, a request answers within this (503 if Redis does not).
    request_deadline_seconds: float = 5.0
    list_limit_max: int = 200

    # Delivery
    subscriber_queue: int = 1_000
    heartbeat_seconds: float = 15.0
    sse_retry_ms: int = 2_000
    send_timeout_seconds: float = 10.0
    replay_batch: int = 1_000
    # Test hook: a pause between registering with the hub and reading the backlog, so tests can
    # write events into that window and prove each arrives exactly once.
    resume_delay_seconds: float = 0.0
    # Test hook: a pause before the hub sends a subscription a stream asked for, so tests can
    # write events while a stream waits for it and prove they arrive (the subscribe-then-read
    # order).
    subscribe_delay_seconds: float = 0.0

    # Access (docs/security.md)
    # production unless bound to loopback, for auto
    mode: Literal["auto", "development", "production"] = "auto"
    secret: str | None = None  # signs stream tokens; required in production
    api_keys: CommaList = []  # "owner:key,owner2:key2"; more with `stepstream keys create OWNER`
    token_ttl_seconds: float = 900.0
    cors_origins: CommaList = []  # comma separated; empty = CORS off
    # /openapi.json lists every task's schema: in production it needs a key unless this is set.
    public_openapi: bool = False

    # Limits
    max_input_depth: int = 32
    # An answer's value (POST /api/jobs/{id}/input), as compact JSON: it is stored in the
    # record and sent on every stream of the job, to browsers too.
    max_answer_bytes: int = Field(default=65_536, ge=1)
    max_string_length: int = 200_000
    max_unfinished_per_owner: int = 1_000
    submissions_per_second: int = 50
    # Open streams per web process (server/guards.py). All of them: 20,000 at ~25 KiB RSS each
    # is ~500 MiB, and each needs a file descriptor (raise `ulimit -n` above it).
    max_streams: int = 20_000
    # Opened with one API key itself (or, in development, without credentials).
    max_streams_per_key: int = Field(
        default=100,
        # The old name, from when all of an owner's streams counted together (deprecated).
        validation_alias=AliasChoices(
            "STEPSTREAM_MAX_STREAMS_PER_KEY", "STEPSTREAM_MAX_STREAMS_PER_OWNER"
        ),
    )
    max_streams_per_token: int = 20  # opened with one stream token
    max_batch_size: int = 1_000
    max_delay_seconds: int = 30 * 24 * 3600  # the furthest ahead a job may be scheduled

    def is_production(self, bound_host: str | None) -> bool:
        if self.mode != "auto":
            return self.mode == "production"
        # auto: open only when nobody but this machine can reach us.
        return bound_host not in LOOPBACK


class WorkerSettings(_Environment):
    """The arq workers: how many jobs, how often they poll, and how a job's lease works."""

    max_jobs: int = 10
    # A worker polls the queue as soon as a job is queued, and this often otherwise.
    poll_delay_seconds: float = 0.5
    job_timeout_seconds: int = 3_600
    # A running job holds a lease its worker renews; a killed worker's jobs are taken over by
    # another worker once the lease lapses (arq alone would wait the whole job timeout).
    lease_seconds: float = 8.0
    # On SIGTERM a worker takes no new jobs and lets running ones finish for this long; the
    # rest are handed back to the queue for another worker.
    shutdown_grace_seconds: int = 20
    # Each worker writes a heartbeat this often; it expires after three missed beats.
    worker_heartbeat_seconds: float = 2.0
    # Jobs that start jobs (tasks/children.py): the most children one ctx.map (or ctx.spawn)
    # starts, and how deep a tree may go (a submitted job is depth 0, its children 1, ...).
    # Past either, the call fails the parent with ChildrenRefused before any child is created.
    max_children_per_call: int = Field(default=1_000, ge=1)
    max_job_depth: int = Field(default=3, ge=0)


class WebhookSettings(_Environment):
    """Webhooks (docs/deploy.md, "Webhooks"): a job's `callback_url` and the deployment's
    webhook get each terminal event, delivered from a durable outbox by the workers."""

    webhook_url: str = ""  # the deployment webhook: terminal events of every job
    webhook_events: CommaList = ["completed", "failed", "cancelled"]  # what that webhook gets
    webhook_secret: str = ""  # signs each delivery: X-Stepstream-Signature
    # Hosts (names, addresses or networks, each with an optional :port, comma separated) a
    # callback_url may reach although they are internal (loopback, private, link-local...),
    # which are refused by default (tasks/destinations.py).
    webhook_allowed_hosts: CommaList = []
    webhook_allow_public: bool = True  # false: a callback_url may reach the allowed hosts only
    webhook_attempts: int = Field(default=10, ge=1, le=100)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=300)  # one attempt, in all
    webhook_backoff_seconds: float = Field(default=2.0, ge=0)  # doubled after each attempt...
    webhook_max_backoff_seconds: float = Field(default=600.0, ge=0)  # ...up to this
    webhook_concurrency: int = Field(default=10, ge=1, le=1_000)  # deliveries in flight/worker
    webhook_outbox_maxlen: int = Field(default=10_000, ge=1)  # undelivered events kept
    # Deprecated, read for old deployments: the failure alert is now the deployment webhook
    # filtered to `failed` (docs/deploy.md, "Webhooks").
    alert_webhook_url: str = ""
    alert_webhook_secret: str = ""
    alert_webhook_attempts: int | None = None
    alert_webhook_timeout_seconds: float | None = None
    alert_webhook_backoff_seconds: float | None = None
    # The address people reach the server at, for links in webhooks (https://jobs.example.com)
    public_url: str = ""

    @field_validator("webhook_events")
    @classmethod
    def _known_events(cls, value: list[str]) -> list[str]:
        unknown = [e for e in value if e not in WEBHOOK_EVENTS]
        if unknown:
            raise ValueError(
                f"unknown event(s) {', '.join(unknown)}: use {', '.join(sorted(WEBHOOK_EVENTS))}"
            )
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _allow_entries(cls, value: list[str]) -> list[str]:
        from stepstream.tasks.destinations import parse_entry

        for entry in value:
            parse_entry(entry)  # ValueError names the entry
        return value

    @model_validator(mode="after")
    def _alert_is_a_deployment_webhook(self) -> WebhookSettings:
        """The old failure alert settings configure the deployment webhook, for `failed` only,
        unless the webhook settings themselves are given."""
        given = self.model_fields_set
        if self.alert_webhook_url and not self.webhook_url:
            self.webhook_url = self.alert_webhook_url
            if "webhook_events" not in given:
                self.webhook_events = ["failed"]
        if self.alert_webhook_secret and not self.webhook_secret:
            self.webhook_secret = self.alert_webhook_secret
        for old, new in (
            ("alert_webhook_attempts", "webhook_attempts"),
            ("alert_webhook_timeout_seconds", "webhook_timeout_seconds"),
            ("alert_webhook_backoff_seconds", "webhook_backoff_seconds"),
        ):
            if getattr(self, old) is not None and new not in given:
                setattr(self, new, getattr(self, old))
        return self

    @property
    def webhook_states(self) -> frozenset[str]:
        """The terminal states the deployment webhook is told about (none without its URL)."""
        return frozenset(self.webhook_events) if self.webhook_url else frozenset()

    @property
    def webhooks_configured(self) -> bool:
        """Whether the operator asked for webhooks: a deployment webhook, or callback URLs
        allowed by a setting (public ones by default need a secret in production: see
        ``callbacks_refused``)."""
        return bool(
            self.webhook_url
            or self.webhook_allowed_hosts
            or ("webhook_allow_public" in self.model_fields_set and self.webhook_allow_public)
        )

    def callbacks_refused(self, production: bool) -> str | None:
        """Why no ``callback_url`` is taken at all: in production, nothing to sign them with."""
        if production and not self.webhook_secret:
            return (
                "is not taken: this production deployment has no STEPSTREAM_WEBHOOK_SECRET to "
                "sign webhooks with (an operator sets it to turn callbacks on)"
            )
        return None

    def webhook_problem(self, production: bool) -> str | None:
        """Why a process cannot start with these webhook settings, in one plain line."""
        if production and self.webhooks_configured and not self.webhook_secret:
            return (
                "Stepstream runs in production mode and webhooks are configured "
                "(STEPSTREAM_WEBHOOK_URL, STEPSTREAM_WEBHOOK_ALLOWED_HOSTS or "
                "STEPSTREAM_WEBHOOK_ALLOW_PUBLIC), but STEPSTREAM_WEBHOOK_SECRET is not set: "
                "receivers could not tell deliveries from forgeries. Set it to a long random "
                "value, the same in every web and worker process."
            )
        return None


class LLMSettings(_Environment):
    """AI workloads (docs/ai-workloads.md): the LLM provider and a step's streamed text."""

    # offline: deterministic, no network; openai: any OpenAI-compatible server
    llm_provider: Literal["offline", "openai"] = "offline"
    llm_base_url: str = "https://api.openai.com/v1"  # any OpenAI-compatible server
    llm_api_key: str = ""
    llm_model: str = "gpt-4o-mini"
    llm_timeout_seconds: float = 60.0  # one HTTP request
    # 429/5xx/timeouts are retried inside the call this many times, waiting Retry-After when it
    # is at most llm_max_inline_wait_seconds; past either limit the job retries (RetryAfter).
    llm_max_retries: int = 2
    llm_max_inline_wait_seconds: float = 10.0
    # A step's streamed text (ctx.output(), ctx.llm(stream=True)): at most one `output` event
    # per this many seconds per step; the deltas written in between go together.
    output_interval_seconds: float = Field(default=0.05, ge=0.0, le=10.0)
    # The offline provider's streamed reply: the pause before each word.
    llm_offline_word_seconds: float = Field(default=0.02, ge=0.0, le=10.0)


class Settings(LLMSettings, WebhookSettings, WorkerSettings, HttpSettings, StoreSettings):
    """Every setting, grouped by concern in its bases; one flat object, as every process
    reads them (``STEPSTREAM_<NAME>``, documented in docs/configuration.md)."""

    def worker_problem(self) -> str | None:
        """Why a worker cannot start, in one plain line. A worker binds no address to judge
        by: it is in production when STEPSTREAM_MODE says so."""
        return self.webhook_problem(self.mode == "production")

    def production_problem(self, bound_host: str | None) -> str | None:
        """Why a web process bound to ``bound_host`` cannot start, in one plain line."""
        if self.is_production(bound_host) and not self.secret:
            return (
                "Stepstream runs in production mode here (STEPSTREAM_MODE, or a non-loopback "
                "address) and needs STEPSTREAM_SECRET to sign stream tokens. Set it to a long "
                "random value (for example `python -c 'import secrets; "
                "print(secrets.token_hex(32))'`), or set STEPSTREAM_MODE=development on a "
                "trusted machine."
            )
        return self.webhook_problem(self.is_production(bound_host))


def describe_errors(exc: ValidationError) -> list[str]:
    """Each invalid setting as one plain line, named as it is set in the environment."""
    return [
        f"STEPSTREAM_{'_'.join(str(part) for part in error['loc']).upper()} is not valid: "
        f"{error['msg']}"
        for error in exc.errors(include_url=False)
    ]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
