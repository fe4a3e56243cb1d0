"""``stepstream doctor``: check a deployment's configuration and say what is wrong in plain words.

    python -m stepstream.doctor [--url http://host:8000]

It reads the configuration from the environment (as the web and worker processes do), connects
to Redis, looks at the settings that lose data when they are wrong (eviction, persistence),
counts the live workers, and with ``--url`` asks a web process whether it is ready. It changes
nothing. Exit status 0 when nothing is wrong (warnings allowed), 1 otherwise.

It imports the job side's settings and key names (``tasks``), never the web server.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis
from pydantic import ValidationError

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)
    out: Callable[[str], None] = print

    def add(self, level: str, message: str) -> None:
        self.lines.append((level, message))
        self.out(f"{level:>4}  {message}")

    @property
    def failed(self) -> bool:
        return any(level == FAIL for level, _ in self.lines)


def redact(url: str) -> str:
    """The URL without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def check_webhooks(report: Report, settings: Any) -> None:
    if settings.alert_webhook_url or settings.alert_webhook_secret:
        report.add(
            WARN,
            "STEPSTREAM_ALERT_WEBHOOK_* are deprecated: they set the deployment webhook "
            "for failed jobs; use STEPSTREAM_WEBHOOK_URL (with STEPSTREAM_WEBHOOK_EVENTS=failed) "
            "and STEPSTREAM_WEBHOOK_SECRET",
        )
    if settings.webhook_url:
        if urlsplit(settings.webhook_url).scheme not in ("http", "https"):
            report.add(FAIL, "STEPSTREAM_WEBHOOK_URL must be an http(s) URL")
        else:
            events = ", ".join(sorted(settings.webhook_states))
            report.add(OK, f"{events} events go to {redact(settings.webhook_url)}")
    else:
        report.add(WARN, "STEPSTREAM_WEBHOOK_URL is not set: nobody is told when a job fails")
    if not settings.webhook_secret:
        report.add(
            WARN,
            "STEPSTREAM_WEBHOOK_SECRET is not set: webhook deliveries (callback_url and "
            "STEPSTREAM_WEBHOOK_URL) go unsigned, and receivers cannot tell them from forgeries",
        )


def check_settings(report: Report) -> Any:
    from stepstream.tasks.settings import Settings, describe_errors

    try:
        settings = Settings()
    except ValidationError as exc:
        for line in describe_errors(exc):
            report.add(FAIL, line)
        return None
    report.add(OK, "configuration read from the environment")
    if not isinstance(logging.getLevelName(settings.log_level.upper()), int):
        report.add(FAIL, f"STEPSTREAM_LOG_LEVEL={settings.log_level!r}: use DEBUG, INFO or WARNING")
    if settings.job_log_maxlen < 100:
        report.add(
            WARN,
            f"STEPSTREAM_JOB_LOG_MAXLEN={settings.job_log_maxlen} keeps very few "
            "events per job: reconnecting clients will often get a reset",
        )
    if settings.retention_seconds < 3600:
        report.add(
            WARN,
            f"STEPSTREAM_RETENTION_SECONDS={settings.retention_seconds}: job records "
            "and logs vanish within the hour",
        )
    if settings.lease_seconds < 3:
        report.add(
            WARN,
            f"STEPSTREAM_LEASE_SECONDS={settings.lease_seconds:g} is short: a busy "
            "worker may lose a running job to another",
        )
    check_webhooks(report, settings)
    mode = str(getattr(settings, "mode", "auto")).lower()
    if mode == "production" and not getattr(settings, "secret", None):
        report.add(FAIL, "STEPSTREAM_MODE=production needs STEPSTREAM_SECRET (a long random value)")
    webhook_problem = settings.webhook_problem(mode == "production")
    if webhook_problem:
        report.add(FAIL, webhook_problem)
    for module in settings.task_modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            report.add(
                FAIL,
                f"task module {module!r} (STEPSTREAM_TASK_MODULES) does not import: "
                f"{type(exc).__name__}: {exc}",
            )
    return settings


def primary_url(report: Report, settings: Any) -> str | None:
    """REDIS_URL; with Sentinels, it with the host and port of the primary they name."""
    if not settings.sentinels:
        return str(settings.redis_url)
    from redis.sentinel import Sentinel

    name = settings.sentinel_master
    timeouts: dict[str, Any] = {"socket_timeout": 3, "socket_connect_timeout": 3}
    for host, port in settings.sentinels:
        try:
            with redis.Redis(host=host, port=port, **timeouts) as sentinel:
                sentinel.execute_command("SENTINEL", "CKQUORUM", name)
        except redis.RedisError as exc:
            report.add(WARN, f"Sentinel {host}:{port}: {type(exc).__name__}: {exc}")
    try:
        sentinels: Any = Sentinel(settings.sentinels, sentinel_kwargs=timeouts)  # type: ignore[no-untyped-call]
        primary: tuple[str, int] = sentinels.discover_master(name)
    except redis.RedisError as exc:
        report.add(FAIL, f"no Sentinel of STEPSTREAM_SENTINELS names a primary {name!r}: {exc}")
        return None
    host = f"[{primary[0]}]" if ":" in primary[0] else primary[0]
    report.add(OK, f"the Sentinels name {host}:{primary[1]} as the primary {name!r}")
    parts = urlsplit(settings.redis_url)
    credentials, at, _ = parts.netloc.rpartition("@")
    return str(urlunsplit(parts._replace(netloc=f"{credentials}{at}{host}:{primary[1]}")))


def check_redis(report: Report, settings: Any) -> None:
    from stepstream.tasks.keyspace import Keys

    url = primary_url(report, settings)
    if url is None:
        return
    try:
        # Any: redis-py's sync and async clients share type stubs that say "maybe awaitable".
        client: Any = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=3, socket_timeout=3
        )
        client.ping()
    except Exception as exc:
        report.add(
            FAIL, f"cannot reach Redis at {redact(url)} (REDIS_URL): {type(exc).__name__}: {exc}"
        )
        return
    with client:
        info: dict[str, Any] = client.info()
        version = info.get("valkey_version") or info.get("redis_version", "?")
        report.add(OK, f"Redis reachable at {redact(url)} (version {version})")
        if info.get("role") not in (None, "master", "primary"):
            report.add(FAIL, "REDIS_URL points at a replica: Stepstream must write to the primary")
        _check_config(report, client)
        used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        if limit and used > 0.8 * limit:
            report.add(
                WARN,
                f"Redis uses {used / 2**20:.0f} MiB of its {limit / 2**20:.0f} MiB "
                "maxmemory: lower the log caps or the retention, or give it more",
            )
        keys = Keys(settings.prefix)
        workers = client.zrangebyscore(keys.workers, int(time.time() * 1000) - 60_000, "+inf")
        beats = _mget(client, [keys.worker(w) for w in workers])
        alive = [w for w, beat in zip(workers, beats, strict=True) if beat]
        if alive:
            report.add(OK, f"{len(alive)} worker(s) alive (prefix {settings.prefix!r})")
        else:
            report.add(
                WARN,
                f"no worker has a live heartbeat under prefix {settings.prefix!r}: "
                "jobs will wait in the queue until one starts",
            )
        queued = client.zcard(keys.queue)
        report.add(OK, f"{queued} job(s) in the queue (waiting or running)")
        if settings.cluster_url:
            check_webhook_agreement(report, client, keys, held=False)
            return  # the outboxes are the cluster's: check_cluster
        waiting = client.xlen(keys.webhook_outbox)
        if waiting >= settings.webhook_outbox_maxlen:
            report.add(
                FAIL,
                f"the webhook outbox is full ({waiting} undelivered events): new webhook events "
                "are dropped; is a receiver down? (STEPSTREAM_WEBHOOK_OUTBOX_MAXLEN)",
            )
        elif waiting:
            report.add(OK, f"{waiting} webhook event(s) not delivered yet")
        check_webhook_agreement(report, client, keys)


def check_cluster(report: Report, settings: Any) -> None:
    """The log plane's cluster (``STEPSTREAM_CLUSTER_URL``): its state, and every partition's
    webhook outbox and queue outbox (entries a worker should have drained)."""
    from redis.cluster import ClusterNode, RedisCluster

    from stepstream.tasks import planes
    from stepstream.tasks.destinations import redis_endpoints
    from stepstream.tasks.keyspace import Keys

    first, *others = settings.cluster_seeds
    try:
        client: Any = RedisCluster.from_url(
            first,
            startup_nodes=[ClusterNode(*node) for node in redis_endpoints(others)],  # type: ignore[no-untyped-call]
            decode_responses=True,
            socket_connect_timeout=3,
            socket_timeout=3,
        )
        state = client.cluster_info().get("cluster_state")
    except Exception as exc:
        report.add(
            FAIL,
            f"cannot reach the cluster at {', '.join(map(redact, settings.cluster_seeds))} "
            f"(STEPSTREAM_CLUSTER_URL): {type(exc).__name__}: {exc}",
        )
        return
    with client:
        primaries = len(client.get_primaries())
        if state != "ok":
            report.add(FAIL, f"the cluster's state is {state!r}, not 'ok': slots are unserved")
            return
        report.add(OK, f"cluster reachable, state ok, {primaries} primaries")
        keys = Keys.of_deployment(settings)
        parts = keys.every_partition()
        pipe = client.pipeline()
        for part in parts:
            pipe.xlen(part.webhook_outbox)
            pipe.hlen(part.webhooks_held)
            pipe.hvals(part.queue_outbox)
        found = pipe.execute()
        waiting, held = sum(found[0::3]), sum(found[1::3])
        now_ms = int(time.time() * 1000)
        left = sum(
            1
            for entries in found[2::3]
            for text in entries
            if now_ms - planes.decode(text)[0] > 60_000
        )
        if left:
            report.add(
                FAIL,
                f"{left} queue outbox entry(ies) older than a minute: their jobs have no arq "
                "entry yet; is a worker running, and does it reach REDIS_URL?",
            )
        if waiting:
            report.add(OK, f"{waiting} webhook event(s) not delivered yet")
        if held:
            report.add(FAIL, f"{held} webhook delivery(ies) held by a worker's settings")


def check_webhook_agreement(report: Report, client: Any, keys: Any, *, held: bool = True) -> None:
    """The live processes' webhook settings (tasks/webhook_settings.py), and (``held``) the
    deliveries a worker's settings hold."""
    from stepstream.tasks import webhook_settings

    ids = client.zrevrange(keys.webhook_settings, 0, webhook_settings.READ_LIMIT - 1)
    announced = webhook_settings.parse(_mget(client, [keys.webhook_settings_of(i) for i in ids]))
    found = webhook_settings.disagreements(announced)
    for disagreement in found:
        report.add(FAIL, f"webhook settings: {disagreement.line()}")
    if announced and not found:
        report.add(OK, f"the {len(announced)} live process(es) agree on their webhook settings")
    if not held:
        return
    held_count = int(client.hlen(keys.webhooks_held))
    if held_count:
        _, sample = client.hscan(keys.webhooks_held, 0, count=100)
        reasons = webhook_settings.held_reasons(sample.values())
        report.add(
            FAIL,
            f"{held_count} webhook delivery(ies) held by a worker's settings, waiting in the "
            f"outbox for a worker whose settings allow them: {'; '.join(reasons[:5])}",
        )


def _mget(client: Any, names: list[str]) -> list[Any]:
    return list(client.mget(names)) if names else []


def _check_config(report: Report, client: Any) -> None:
    try:
        config: dict[str, str] = client.config_get("maxmemory-policy")
        config.update(client.config_get("appendonly"))
    except redis.ResponseError:
        # Managed Redis often forbids CONFIG: say so rather than guess.
        report.add(
            WARN,
            "cannot read Redis's CONFIG (managed service?): make sure "
            "maxmemory-policy is noeviction and persistence is on",
        )
        return
    policy = config.get("maxmemory-policy", "")
    if policy and policy != "noeviction":
        report.add(
            FAIL,
            f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis "
            "would evict job records, logs and queued jobs; set it to noeviction",
        )
    if config.get("appendonly") != "yes":
        report.add(
            WARN,
            "Redis appendonly is off: a Redis restart loses the jobs and events "
            "written since the last snapshot (see docs/deploy.md)",
        )
    else:
        report.add(OK, "Redis persistence: append-only file on")


def check_web(report: Report, url: str) -> None:
    base = url.rstrip("/")
    try:
        response = httpx.get(f"{base}/readyz", timeout=5)
    except httpx.HTTPError as exc:
        report.add(FAIL, f"cannot reach the web process at {base}: {type(exc).__name__}: {exc}")
        return
    try:
        body: dict[str, Any] = response.json()
    except (json.JSONDecodeError, ValueError):
        body = {}
    if response.status_code != 200:
        detail = body.get("redis") or response.text[:200]
        report.add(FAIL, f"{base}/readyz answered {response.status_code}: {detail}")
        return
    if body.get("hub") not in (None, "connected"):
        report.add(WARN, f"{base} is up but its live feed from Redis is {body.get('hub')}")
    else:
        report.add(OK, f"web process at {base} is ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepstream doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a web process to check, e.g. http://127.0.0.1:8000")
    args = parser.parse_args(argv)
    report = Report()
    # The same import path as the processes use (the project's folder, as in the Procfile).
    sys.path.insert(0, os.getcwd())
    settings = check_settings(report)
    if settings is not None:
        check_redis(report, settings)
        if settings.cluster_url:
            check_cluster(report, settings)
    if args.url:
        check_web(report, args.url)
    if report.failed:
        print("\nSomething is wrong: see the FAIL lines above.")
        return 1
    print("\nAll is well." if not any(lv == WARN for lv, _ in report.lines) else "\nNo errors.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
