"""Redis clients that ride out a short outage (a restart, a failover) instead of failing jobs.

Every client Stepstream makes comes from here, so one setting moves them all: with
``STEPSTREAM_SENTINELS`` each finds the primary through Sentinel, and finds it again when a
command fails on a lost connection or on a demoted primary (redis-py's Sentinel connections turn
its ``READONLY`` error into a connection error and ask the Sentinels again), within its retries.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import hiredis
import redis
from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError, TimeoutError

from stepstream.tasks.destinations import redis_endpoints
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.settings import Settings

RETRYABLE = [ConnectionError, TimeoutError, ConnectionResetError, OSError]
REDIS_PY = tuple(int(part) for part in redis.__version__.split(".")[:2])

# A connect that has not completed by then is given up and tried again (arq's own pool used 1 s).
CONNECT_TIMEOUT_SECONDS = 5.0

# Asking one Sentinel where the primary is: a Sentinel that does not answer within this is
# skipped for the next one, instead of holding every reconnect.
SENTINEL_TIMEOUT_SECONDS = 1.0


class HiredisPacking(AbstractConnection):
    """A connection whose commands are packed by hiredis (C), not by redis-py's Python loop:
    the append script's create is some ninety arguments, and packing them was a tenth of a
    submission's CPU in the web process. The bytes are the same; what hiredis does not take
    (a bool, a type redis-py refuses) goes to redis-py's packer, and its error."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "CONFIG RESETSTAT": two arguments
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)


class FastConnection(HiredisPacking, Connection):
    pass


class FastSSLConnection(HiredisPacking, SSLConnection):
    pass


class FastUnixDomainSocketConnection(HiredisPacking, UnixDomainSocketConnection):
    pass


# The connection class redis-py picks for a URL's scheme -> the same with hiredis packing.
FAST_CONNECTIONS: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: FastConnection,
    SSLConnection: FastSSLConnection,
    UnixDomainSocketConnection: FastUnixDomainSocketConnection,
}


class PrimaryConnection(HiredisPacking, SentinelManagedConnection):
    """A connection to the primary the Sentinels name, which asks them again on every retry.

    redis-py 5 asks once, then retries the connect to that address with the whole retry policy
    (redis/redis-py#3560, #3874): a SIGKILLed primary held every client for ~20 s after the
    Sentinels had promoted its replica. Here the connect to one address is tried once; the
    retries of ``connect`` (``_connect_retry``) ask the Sentinels each time.
    """

    async def connect_to(self, address: tuple[str, int]) -> None:
        patient = self.retry
        self.retry = Retry(NoBackoff(), 0)
        try:
            await super().connect_to(address)  # type: ignore[no-untyped-call]
        finally:
            self.retry = patient


class PrimarySSLConnection(PrimaryConnection, SSLConnection):
    pass


def patient_retry(attempts: int = 25) -> Retry:
    # 25 attempts with backoff capped at 1 s: about 20 s of patience, then the error surfaces.
    # A Sentinel failover (the primary seen down, a replica promoted) fits inside it.
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), attempts)


def connect(settings: Settings, *, attempts: int | None = 25) -> Redis:
    """A client of the primary: at ``REDIS_URL``, or the one the Sentinels name.

    ``attempts``: how often a command is tried before its connection error surfaces. None
    for a caller that reconnects by itself (the hub's subscription catches up from the log).
    """
    return cast(Redis, _primary(settings, Redis, attempts, decode_responses=True))


# A cluster node's connection is tried this often before the client re-reads the slot map.
NODE_ATTEMPTS = 3


class LogPlaneCluster(RedisCluster):
    """redis-py's asyncio cluster client, whose re-reading of the slot map is retried too.

    redis-py 5 re-reads it (``initialize``) outside its retry loop, and asks the first primary
    of the new map for ``COMMAND``: during a failover that is still the dead primary, and the
    command failed at once, without a retry, whenever the dead primary came first in the map
    (redis/redis-py#2427). Here the re-reading is tried again with backoff, about 20 s in all.
    """

    # How many times a re-reading of the slot map is tried (``connect_cluster`` sets it): kept
    # here, as redis-py 6 renamed the attribute its ``cluster_error_retry_attempts`` set.
    slot_map_attempts = 25

    async def initialize(self) -> LogPlaneCluster:
        attempts = max(1, self.slot_map_attempts)
        for attempt in range(1, attempts + 1):
            try:
                await super().initialize()
                break
            except (ConnectionError, TimeoutError, OSError):
                if attempt == attempts:
                    raise
                await asyncio.sleep(min(1.0, 0.05 * 2**attempt))
        return self


def connect_cluster(settings: Settings, *, attempts: int = 25) -> RedisCluster:
    """A client of the log plane's cluster at ``STEPSTREAM_CLUSTER_URL`` (seed nodes; the
    rest it learns from the cluster's slot map, from the first seed that answers), decoding
    as :func:`connect`'s does: the store's when the logs are on a cluster (tasks/planes.py,
    ``connect_log_plane``).

    redis-py 5 (arq caps it below 6): scripts run on it when every key of a call shares one
    slot; ``pipeline(transaction=True)`` is refused, and its asyncio client has no pub/sub
    (``SPUBLISH`` goes as a command; ``SSUBSCRIBE`` needs a connection to the slot's node).
    """
    if not settings.cluster_url:
        raise ValueError("STEPSTREAM_CLUSTER_URL is not set")
    if REDIS_PY < (6,):
        # Patience in two layers: a node's connection is retried briefly (about 0.7 s), then
        # the client re-reads the slot map and tries again, ``attempts`` times (about 20 s in
        # all). One patient layer at the node would keep dialling a dead primary's address
        # (~22 s measured) while its replica had long taken its slots.
        patience: dict[str, Any] = {
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), NODE_ATTEMPTS),
            "cluster_error_retry_attempts": attempts,
        }
    else:
        # redis-py 6 made ``retry`` the cluster's own (each try re-reads the slot map after a
        # connection error) and dropped ``cluster_error_retry_attempts``.
        patience = {"retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), attempts)}
    first, *others = settings.cluster_seeds
    client = LogPlaneCluster.from_url(
        first,
        # Reached with the first seed's credentials and TLS, as every node it finds is.
        startup_nodes=[AsyncClusterNode(*node) for node in redis_endpoints(others)],
        decode_responses=True,
        retry_on_error=list(RETRYABLE),
        health_check_interval=30,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        **patience,
    )
    client.slot_map_attempts = attempts
    return cast(RedisCluster, client)


def arq_pool(settings: Settings) -> ArqRedis:
    """arq's client (the queue), from the same factory: what arq's ``create_pool`` makes,
    with the retries it leaves out of a Sentinel client. Not connected until first used."""
    pool = cast(ArqRedis, _primary(settings, ArqRedis, 25, decode_responses=False))
    pool.default_queue_name = Keys(settings.prefix).queue
    return pool


def _primary(
    settings: Settings, client: type[Redis], attempts: int | None, *, decode_responses: bool
) -> Any:
    options: dict[str, Any] = {"decode_responses": decode_responses}
    if attempts is not None:
        options.update(
            retry=patient_retry(attempts),
            retry_on_error=list(RETRYABLE),
            health_check_interval=30,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        )
    if not settings.sentinels:
        made = client.from_url(settings.redis_url, **options)
        pool = made.connection_pool
        pool.connection_class = FAST_CONNECTIONS.get(pool.connection_class, pool.connection_class)
        return made
    primary = parse_url(settings.redis_url)
    options.update({k: v for k, v in primary.items() if k in ("db", "username", "password")})
    tls = settings.redis_url.startswith("rediss://")
    options["connection_class"] = PrimarySSLConnection if tls else PrimaryConnection
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinels,
        sentinel_kwargs={
            "socket_timeout": SENTINEL_TIMEOUT_SECONDS,
            "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
        },
    )
    return sentinel.master_for(settings.sentinel_master, redis_class=client, **options)


def arq_settings(settings: Settings) -> RedisSettings:
    """arq's connection settings, for arq's own CLI and ``create_pool``. With Sentinels, arq
    passes no retry policy on: :func:`arq_pool` is the client with one."""
    if settings.sentinels:
        primary = parse_url(settings.redis_url)
        connection = RedisSettings(
            host=list(settings.sentinels),
            sentinel=True,
            sentinel_master=settings.sentinel_master,
            database=int(primary.get("db") or 0),
            username=primary.get("username"),
            password=primary.get("password"),
            ssl=settings.redis_url.startswith("rediss://"),
        )
    else:
        connection = RedisSettings.from_dsn(settings.redis_url)
    connection.retry_on_error = list(RETRYABLE)
    connection.retry = patient_retry()
    return connection
