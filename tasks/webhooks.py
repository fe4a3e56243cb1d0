"""One webhook event: its body, its signature, and one attempt at POSTing it.

The body is the same bytes on every attempt::

    {"id": "<job id>:<event id>", "type": "job.completed" | "job.failed" | "job.cancelled",
     "job_id": "...", "at": "<finished_at>",
     "job": {the record as GET /api/jobs/{id} shows it, without error.traceback, with links}}

``id`` names the event, not the attempt: a receiver that stores the ids it has handled drops
the duplicates at-least-once delivery brings. It must take the id from the signed body: the
signature covers the body and the timestamp, not the headers. Headers: ``X-Stepstream-Event-Id``
(a copy of ``id``, for logs and routing), ``X-Stepstream-Event`` (the type),
``X-Stepstream-Attempt``, ``X-Stepstream-Timestamp`` (unix seconds) and, with a secret,
``X-Stepstream-Signature: sha256=<hex>``, the HMAC-SHA256 of ``"<timestamp>." + body``: a
receiver checks it and refuses old timestamps, so a captured request cannot be replayed later.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

import httpx

from stepstream.tasks.destinations import Policy, Refused, Target, Unresolvable
from stepstream.tasks.models import JobRecord, job_links

USER_AGENT = "stepstream-webhooks"
RETRY_STATUSES = frozenset({408, 425, 429})


def event_id(job_id: str, job_event_id: str) -> str:
    """The id of the webhook event for the terminal event ``job_event_id`` of a job."""
    return f"{job_id}:{job_event_id}"


def build_body(record: JobRecord, event: str, public_url: str = "") -> bytes:
    job = record.model_dump(mode="json")  # callback_url is never dumped
    if isinstance(job.get("error"), dict):
        job["error"].pop("traceback", None)
    job["links"] = job_links(public_url.rstrip("/"), record.id)
    payload = {
        "id": event,
        "type": f"job.{record.state.value}",
        "job_id": record.id,
        "at": record.finished_at,
        "job": job,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``"<timestamp>." + body`` with ``secret``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def headers_for(event: str, type_: str, attempt: int, body: bytes, secret: str) -> dict[str, str]:
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Stepstream-Event-Id": event,
        "X-Stepstream-Event": type_,
        "X-Stepstream-Attempt": str(attempt),
        "X-Stepstream-Timestamp": str(timestamp),
    }
    if secret:
        headers["X-Stepstream-Signature"] = sign(secret, timestamp, body)
    return headers


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    retry: bool  # another attempt may succeed
    detail: str  # "HTTP 503", "no answer within 10s", "refused: ..."
    # This worker's settings refuse it (not the receiver): kept for a worker they allow.
    held: bool = False


async def post(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    policy: Policy | None,
    timeout: float,
) -> Outcome:
    """POST ``body`` once, within ``timeout`` seconds in all (resolving the host included).

    With a ``policy`` (a callback URL) the host is resolved and checked now, and the request
    goes to the address that was checked. Without one (the operator's own webhook URL) it goes
    as is. The answer's body is never read.
    """
    try:
        async with asyncio.timeout(timeout):
            extensions: dict[str, str] = {}
            if policy is not None:
                url, extensions = _pinned(await policy.check(url), headers)
            request = client.build_request(
                "POST", url, content=body, headers=headers, extensions=extensions
            )
            response = await client.send(request, stream=True)
            await response.aclose()
    except Unresolvable as exc:
        return Outcome(False, True, str(exc))
    except Refused as exc:
        return Outcome(False, False, f"refused: the URL {exc}", held=True)
    except TimeoutError:
        return Outcome(False, True, f"no answer within {timeout:g}s")
    except (httpx.HTTPError, OSError) as exc:
        return Outcome(False, True, f"{type(exc).__name__}: {exc}".rstrip(": "))
    status = response.status_code
    if 200 <= status < 300:
        return Outcome(True, False, f"HTTP {status}")
    if status >= 500 or status in RETRY_STATUSES:
        return Outcome(False, True, f"HTTP {status}")
    if 300 <= status < 400:
        return Outcome(False, False, f"HTTP {status} (redirects are not followed)")
    return Outcome(False, False, f"HTTP {status}")


def _pinned(target: Target, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The request URL with the checked address in place of the name; ``Host`` and TLS (SNI
    and the certificate check) still use the name."""
    url = httpx.URL(target.url)
    if url.host == target.address:
        return target.url, {}
    headers["Host"] = url.netloc.decode("ascii")
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    return str(url.copy_with(host=target.address)), extensions
