"""Redis clients that ride out a short outage (a restart, a failover) instead of failing jobs."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

RETRYABLE = [ConnectionError, TimeoutError, ConnectionResetError, OSError]


def patient_retry(attempts: int = 25) -> Retry:
    # 25 attempts with backoff capped at 1 s: about 20 s of patience, then the error surfaces.
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), attempts)


def connect(url: str, *, attempts: int = 25) -> Redis:
    client: Redis = Redis.from_url(
        url,
        decode_responses=True,
        retry=patient_retry(attempts),
        retry_on_error=RETRYABLE,
        health_check_interval=30,
    )
    return client
