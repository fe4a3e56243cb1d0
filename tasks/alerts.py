"""The failure webhook: a POST to ``STEPSTREAM_ALERT_WEBHOOK_URL`` when a job fails for good.

Never on ``retrying``: only the terminal ``failed`` event, which the append's compare-and-set
lets happen once per job, so each failed job raises one alert (``X-Stepstream-Delivery`` lets a
receiver drop the duplicate a retry after a lost response can cause).

Delivery never holds up a job or the worker: the runtime hands the alert to a bounded
in-memory queue and goes on; a few sender tasks POST it with a timeout, retrying network
errors, 5xx, 408 and 429 with exponential backoff up to ``alert_webhook_attempts`` times. A full
queue (the receiver is down and failures keep coming) drops new alerts with a warning. Alerts
still queued when the worker stops get a short grace period; a killed worker loses its queue,
so the webhook is a notification, not a ledger: the job records stay the source of truth.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
from typing import Any

import httpx

from stepstream.tasks.models import JobRecord, utcnow
from stepstream.tasks.settings import Settings

logger = logging.getLogger("stepstream.alerts")

QUEUE_SIZE = 1_000
SENDERS = 4
MAX_BACKOFF_SECONDS = 60.0
RETRY_STATUSES = frozenset({408, 425, 429})


def build_payload(
    record: JobRecord, attempt: int, error: dict[str, Any], public_url: str = ""
) -> dict[str, Any]:
    base = public_url.rstrip("/")
    return {
        "event": "job.failed",
        "job_id": record.id,
        "task": record.task,
        "owner": record.owner,
        "error": error,
        "attempt": attempt,
        "max_attempts": record.max_attempts,
        "failed_at": utcnow(),
        "links": {
            "self": f"{base}/api/jobs/{record.id}",
            "events": f"{base}/api/jobs/{record.id}/events",
            "retry": f"{base}/api/jobs/{record.id}/retry",
        },
    }


class AlertSender:
    def __init__(
        self,
        url: str,
        *,
        secret: str = "",
        attempts: int = 5,
        timeout: float = 5.0,
        backoff: float = 1.0,
        queue_size: int = QUEUE_SIZE,
        senders: int = SENDERS,
    ) -> None:
        self.url = url
        self.secret = secret.encode()
        self.attempts = max(1, attempts)
        self.timeout = timeout
        self.backoff = backoff
        self.senders = senders
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_size)
        self.delivered = 0
        self.dropped = 0
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> AlertSender | None:
        if not settings.alert_webhook_url:
            return None
        return cls(
            settings.alert_webhook_url,
            secret=settings.alert_webhook_secret,
            attempts=settings.alert_webhook_attempts,
            timeout=settings.alert_webhook_timeout_seconds,
            backoff=settings.alert_webhook_backoff_seconds,
        )

    def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        self._tasks = [
            asyncio.create_task(self._run(), name=f"stepstream-alerts-{i}")
            for i in range(self.senders)
        ]

    def submit(self, payload: dict[str, Any]) -> None:
        """Queue an alert; never waits. A full queue drops it (and says so)."""
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped += 1
            logger.error(
                "alert queue full (%d): the failure alert was dropped",
                self.queue.maxsize,
                extra={"job_id": payload.get("job_id")},
            )

    async def close(self, grace: float = 5.0) -> None:
        """Give queued alerts up to ``grace`` seconds, then stop."""
        if self._tasks:
            try:
                await asyncio.wait_for(self.queue.join(), timeout=grace)
            except TimeoutError:
                logger.warning("worker stopping: %d alert(s) not delivered", self.queue.qsize())
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while True:
            payload = await self.queue.get()
            try:
                await self._deliver(payload)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the sender
                logger.exception("alert delivery crashed", extra={"job_id": payload.get("job_id")})
            finally:
                self.queue.task_done()

    async def _deliver(self, payload: dict[str, Any]) -> bool:
        assert self._client is not None
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "stepstream-alerts",
            "X-Stepstream-Event": str(payload.get("event")),
            "X-Stepstream-Delivery": f"{payload.get('job_id')}:{payload.get('attempt')}",
        }
        if self.secret:
            digest = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
            headers["X-Stepstream-Signature"] = f"sha256={digest}"
        extra = {"job_id": payload.get("job_id")}
        for attempt in range(1, self.attempts + 1):
            try:
                response = await self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    self.delivered += 1
                    logger.info("failure alert delivered", extra=extra)
                    return True
                problem = f"HTTP {response.status_code}"
                if response.status_code < 500 and response.status_code not in RETRY_STATUSES:
                    logger.error("alert webhook refused it (%s)", problem, extra=extra)
                    return False
            if attempt == self.attempts:
                logger.error("alert webhook failed %d times (%s)", attempt, problem, extra=extra)
                return False
            delay = min(MAX_BACKOFF_SECONDS, self.backoff * 2 ** (attempt - 1))
            delay *= 0.5 + random.random() / 2  # jitter: many workers do not retry in step
            logger.warning(
                "alert webhook attempt %d failed (%s); retrying in %.1fs",
                attempt,
                problem,
                delay,
                extra=extra,
            )
            await asyncio.sleep(delay)
        return False


# The worker's sender, installed at startup. The runtime calls ``job_failed`` without knowing
# whether alerts are configured.
_sender: AlertSender | None = None


def install(sender: AlertSender | None) -> None:
    global _sender
    _sender = sender


def job_failed(record: JobRecord, attempt: int, error: dict[str, Any], public_url: str) -> None:
    if _sender is not None:
        _sender.submit(build_payload(record, attempt, error, public_url))
