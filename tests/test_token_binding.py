"""Stream tokens are bound to the mode of the server that minted them and to the API key that
minted them: a development server sharing the secret and Redis mints nothing production takes,
and a revoked key's tokens stop working, open streams included."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time

import httpx

from stepstream.server.revocation import RECHECK_SECONDS
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.processes import ROOT, Web, wait_until
from tests.support.sse import StreamReader
from tests.support.tasks import gate_key
from tests.test_auth import ALICE, PRODUCTION, submit_as
from tests.test_stream_limits import try_stream

SECRET = PRODUCTION["STEPSTREAM_SECRET"]


def assert_refused(response: httpx.Response, code: str, *words: str) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error["message"]
    assert b"data:" not in response.content


def token_uses(url: str, job_id: str, token: str) -> list[httpx.Response]:
    """What a token is for: a job's record and stream, and the firehose."""
    return [
        http.get(f"{url}/api/jobs/{job_id}", params={"token": token}),
        try_stream(f"{url}/api/jobs/{job_id}/events?token={token}"),
        try_stream(f"{url}/api/events?token={token}"),
    ]


def forge(claims: dict[str, object]) -> str:
    """A token signed with the deployment's secret, as server/auth.py encodes one."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    payload = json.dumps(claims).encode()
    signature = hmac.new(SECRET.encode(), payload, hashlib.sha256).digest()
    return f"{b64(payload)}.{b64(signature)}"


def keys_cli(s: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepstream.apikey_command", *args],
        cwd=ROOT,
        env=s.env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_production_refuses_the_tokens_of_a_development_server_sharing_its_secret(
    make_stack: StackFactory,
) -> None:
    s = make_stack(webs=1, workers=0, **PRODUCTION)
    dev = Web({**s.env, "STEPSTREAM_MODE": "development"}, s.log_dir).start()
    s.webs.append(dev)  # stopped with the stack
    job = submit_as(s, ALICE)  # alice's job, on production

    # In development anyone gets a token: for every job (owner null), or for alice's job.
    anyone = http.post(f"{dev.url}/api/events/token")
    assert anyone.status_code == 200 and anyone.json()["scope"] == "events"
    for_her_job = http.post(f"{dev.url}/api/jobs/{job['id']}/token")
    assert for_her_job.status_code == 200
    with_her_key = http.post(f"{dev.url}/api/events/token", headers=ALICE)
    assert with_her_key.status_code == 200
    # They work where they were minted: the development server shares Redis and the secret.
    record = http.get(f"{dev.url}/api/jobs/{job['id']}?token={anyone.json()['token']}")
    assert record.status_code == 200 and record.json()["owner"] == "alice"

    for token in (anyone.json()["token"], with_her_key.json()["token"]):
        for response in token_uses(s.url, job["id"], token):
            assert_refused(response, "unauthorized", "development mode", "production mode")
    job_token = for_her_job.json()["token"]
    for response in token_uses(s.url, job["id"], job_token)[:2]:
        assert_refused(response, "unauthorized", "development mode")

    # Production's own token for the job still opens it.
    own = http.post(f"{s.url}/api/jobs/{job['id']}/token", headers=ALICE).json()["token"]
    assert http.get(f"{s.url}/api/jobs/{job['id']}?token={own}").status_code == 200


def test_production_never_accepts_a_token_without_an_owner_or_an_audience(
    make_stack: StackFactory,
) -> None:
    """Even signed with the secret: a token without an owner (one that would read every
    owner's jobs) or minted before tokens named their audience."""
    s = make_stack(webs=1, workers=0, **PRODUCTION)
    job = submit_as(s, ALICE)
    claims = {"s": "events", "e": time.time() + 600, "i": "forged"}
    ownerless = forge({**claims, "o": None, "a": "production", "k": None})
    for response in token_uses(s.url, job["id"], ownerless):
        assert_refused(response, "unauthorized", "no owner")
    old_format = forge({**claims, "o": None})
    for response in token_uses(s.url, job["id"], old_format):
        assert_refused(response, "unauthorized", "fetch a new one")


def test_a_revoked_key_s_tokens_are_refused_and_their_open_streams_end(
    make_stack: StackFactory,
) -> None:
    s = make_stack(webs=1, workers=1, **PRODUCTION)
    created = keys_cli(s, "create", "carol")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    carol = {"Authorization": f"Bearer {key}"}
    job = submit_as(s, carol, {"events": 5}, task="gated")  # runs while the test pushes its gate
    job_token = job["stream_token"]
    firehose_token = http.post(f"{s.url}/api/events/token", headers=carol).json()["token"]
    alice_token = http.post(f"{s.url}/api/events/token", headers=ALICE).json()["token"]
    job_url = f"{s.url}/api/jobs/{job['id']}"
    readers = {
        "job token": StreamReader(f"{job_url}/events?token={job_token}").start(),
        "firehose token": StreamReader(f"{s.url}/api/events?token={firehose_token}").start(),
        "key": StreamReader(f"{s.url}/api/events", carol).start(),
    }
    bystander = StreamReader(f"{s.url}/api/events?token={alice_token}").start()
    try:
        # Every stream is open once it has carried a live event of the job.
        wait_until(
            lambda: http.get(f"{s.url}/api/stats", headers=ALICE).json()["streams_open"] == 4,
            timeout=10,
            what="four streams attached",
        )
        s.redis().rpush(gate_key(job["id"]), "go")
        for reader in readers.values():
            reader.wait_for(lambda events: any(e.type == "progress" for e in events))
        before = submit_as(s, ALICE)
        bystander.wait_for(lambda events: any(e.data["job_id"] == before["id"] for e in events))

        revoked = keys_cli(s, "revoke", key)
        assert revoked.returncode == 0, revoked.stderr
        revoked_at = time.monotonic()

        # The next use of each token is refused at once (a job's token never opens the
        # firehose), and so is the key.
        uses = token_uses(s.url, job["id"], job_token)[:2]
        uses += token_uses(s.url, job["id"], firehose_token)
        for response in uses:
            assert_refused(response, "token_revoked", "revoked")
        assert http.get(f"{s.url}/api/jobs", headers=carol).status_code == 401

        # The open streams end within the recheck interval: the tokens' with a
        # `token_expired` saying why, the key's own without one.
        for name, reader in readers.items():
            events = reader.wait_closed(timeout=RECHECK_SECONDS + 10)
            if name == "key":
                assert "token_expired" not in [e.type for e in events]
            else:
                assert events[-1].type == "token_expired", name
                assert "revoked" in events[-1].data["reason"]
        # Time is the feature (the recheck interval); the margin allows a loaded machine.
        assert time.monotonic() - revoked_at < RECHECK_SECONDS + 8

        # Another key's token stream goes on.
        after = submit_as(s, ALICE)
        bystander.wait_for(lambda events: any(e.data["job_id"] == after["id"] for e in events))
    finally:
        for reader in [*readers.values(), bystander]:
            reader.close()


def test_a_configured_key_s_tokens_stop_on_a_web_started_without_it(
    make_stack: StackFactory,
) -> None:
    """STEPSTREAM_API_KEYS cannot be changed at runtime: a key is revoked by restarting the
    web processes without it, and its tokens stop working on each one that restarted."""
    s = make_stack(webs=1, workers=0, **PRODUCTION)
    bob = {"Authorization": "Bearer key-bob-0123456789"}
    bobs, alices = submit_as(s, bob), submit_as(s, ALICE)
    for job in (bobs, alices):
        token = job["stream_token"]
        assert http.get(f"{s.url}/api/jobs/{job['id']}?token={token}").status_code == 200

    s.webs[0].stop()
    without_bob = {**s.env, "STEPSTREAM_API_KEYS": "alice:key-alice-0123456789"}
    web = Web(without_bob, s.log_dir).start()
    s.webs.append(web)
    for response in token_uses(web.url, bobs["id"], bobs["stream_token"])[:2]:
        assert_refused(response, "token_revoked")
    # A key still configured keeps its tokens across the restart.
    kept = http.get(f"{web.url}/api/jobs/{alices['id']}?token={alices['stream_token']}")
    assert kept.status_code == 200 and kept.json()["owner"] == "alice"
