"""Subjects: the end user a job belongs to, the listing filtered by it, and subject tokens that
see that subject's jobs and nothing else (production mode)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stepstream import AsyncClient, Client
from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import DOC
from tests.support.processes import wait_until
from tests.support.sse import Event, StreamReader, read_stream
from tests.test_auth import ALICE, BOB, PRODUCTION, finish, submit_as
from tests.test_jobs import store_snapshot


@pytest.fixture(scope="module")
def prod(module_stacks: StackFactory) -> Stack:
    return module_stacks(webs=1, workers=1, **PRODUCTION)


def listed(s: Stack, who: dict[str, str], **params: str) -> list[dict[str, Any]]:
    response = http.get(f"{s.url}/api/jobs", params=params, headers=who)
    assert response.status_code == 200, response.text
    jobs: list[dict[str, Any]] = response.json()["jobs"]
    return jobs


def subject_token(s: Stack, who: dict[str, str], subject: str) -> str:
    response = http.post(f"{s.url}/api/events/token", json={"subject": subject}, headers=who)
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == f"subject:{subject}"
    token: str = response.json()["token"]
    return token


def ends(event: Event, job: dict[str, Any]) -> bool:
    return event.data.get("job_id") == job["id"] and event.type == "completed"


def test_a_job_carries_its_subject_and_the_listing_filters_by_it(prod: Stack) -> None:
    mine = submit_as(prod, ALICE, subject="user-1@example.com")
    other = submit_as(prod, ALICE, subject="auth0|42")
    plain = submit_as(prod, ALICE)
    bobs = submit_as(prod, BOB, subject="user-1@example.com")
    assert mine["subject"] == "user-1@example.com" and plain["subject"] is None
    shown = http.get(f"{prod.url}/api/jobs/{mine['id']}", headers=ALICE).json()
    assert shown["subject"] == "user-1@example.com"

    # Owner-scoped as always: bob's job of the same subject is not alice's.
    assert [j["id"] for j in listed(prod, ALICE, subject="user-1@example.com")] == [mine["id"]]
    assert [j["id"] for j in listed(prod, BOB, subject="user-1@example.com")] == [bobs["id"]]
    assert [j["id"] for j in listed(prod, ALICE, subject="auth0|42")] == [other["id"]]
    assert listed(prod, ALICE, subject="nobody") == []
    everything = {j["id"] for j in listed(prod, ALICE)}
    assert {mine["id"], other["id"], plain["id"]} <= everything

    # A batch carries its subject to the parent and every child.
    batch = http.post(
        f"{prod.url}/api/batches",
        json={"task": "analyze_document", "inputs": [{"text": DOC}] * 2, "subject": "u-batch"},
        headers=ALICE,
    )
    assert batch.status_code == 202, batch.text
    parent = batch.json()
    children = http.get(f"{prod.url}/api/batches/{parent['id']}", headers=ALICE).json()
    ids = {parent["id"], *(c["id"] for c in children["children"])}
    assert {j["id"] for j in listed(prod, ALICE, subject="u-batch")} == ids
    assert {j["subject"] for j in listed(prod, ALICE, subject="u-batch")} == {"u-batch"}

    # The subject is part of an idempotent request's body.
    key = {"Idempotency-Key": "subject-test-1", **ALICE}
    body = {"task": "analyze_document", "input": {"text": DOC}, "subject": "u-a"}
    first = http.post(f"{prod.url}/api/jobs", json=body, headers=key)
    assert first.status_code == 202 and first.json()["subject"] == "u-a"
    again = http.post(f"{prod.url}/api/jobs", json={**body, "subject": "u-b"}, headers=key)
    assert again.status_code == 409
    for job in [mine, other, plain, bobs, first.json()]:
        finish(prod, job["id"], BOB if job is bobs else ALICE)


def test_a_subject_token_sees_only_that_subject_s_jobs(prod: Stack) -> None:
    token = subject_token(prod, ALICE, "u1")

    def streams_open() -> int:
        stats = http.get(f"{prod.url}/api/stats", headers=ALICE, timeout=10).json()
        return int(stats["streams_open"])

    already = streams_open()
    live = StreamReader(f"{prod.url}/api/events?token={token}").start()
    try:
        # Live only (no cursor): a job submitted before the stream is registered is not on it.
        wait_until(lambda: streams_open() > already, timeout=10, what="the stream to open")
        first = submit_as(prod, ALICE, subject="u1")
        # The stream is live once u1's first job reaches it; the others' events follow it.
        live.wait_for(lambda evs: any(e.data.get("job_id") == first["id"] for e in evs))
        others = [
            submit_as(prod, ALICE, subject="u2"),
            submit_as(prod, ALICE),  # no subject
            submit_as(prod, BOB, subject="u1"),  # another owner's u1
        ]
        for job in others:
            finish(prod, job["id"], BOB if job["owner"] == "bob" else ALICE)
        last = submit_as(prod, ALICE, subject="u1")
        live.wait_for(lambda evs: any(ends(e, last) for e in evs))
    finally:
        live.close()
    # Every event of the other jobs was published before the last u1 job's: none arrived.
    assert {e.data["job_id"] for e in live.events} == {first["id"], last["id"]}

    # Replayed from the start of the firehose: still only alice's u1 jobs.
    status, replayed = read_stream(
        f"{prod.url}/api/events?after=0&token={token}",
        stop=lambda e: ends(e, last),
    )
    assert status == 200
    seen = {e.data["job_id"] for e in replayed}
    assert {first["id"], last["id"]} <= seen
    assert not seen & {job["id"] for job in others}
    for job_id in seen:
        record = http.get(f"{prod.url}/api/jobs/{job_id}", headers=ALICE).json()
        assert record["subject"] == "u1" and record["owner"] == "alice"

    # The token reads u1's records and streams; any other job is 404, as if it did not exist.
    record = http.get(f"{prod.url}/api/jobs/{first['id']}?token={token}")
    assert record.status_code == 200 and record.json()["subject"] == "u1"
    status, events = read_stream(f"{prod.url}/api/jobs/{first['id']}/events?after=0&token={token}")
    assert status == 200 and events[-1].type == "completed"
    for job in others:
        for path in ["", "/events"]:
            response = http.get(f"{prod.url}/api/jobs/{job['id']}{path}?token={token}")
            assert response.status_code == 404, (job, path)
    # Read-only: no listing, no writes, no new tokens.
    assert http.get(f"{prod.url}/api/jobs?token={token}").status_code == 401
    assert http.post(f"{prod.url}/api/jobs/{first['id']}/retry?token={token}").status_code == 401
    assert http.post(f"{prod.url}/api/events/token?token={token}").status_code == 401


def test_a_job_token_does_not_open_the_subject_s_other_jobs(prod: Stack) -> None:
    one = submit_as(prod, ALICE, subject="u7")
    two = submit_as(prod, ALICE, subject="u7")
    token = one["stream_token"]
    assert http.get(f"{prod.url}/api/jobs/{one['id']}?token={token}").status_code == 200
    assert http.get(f"{prod.url}/api/jobs/{two['id']}?token={token}").status_code == 404
    assert http.get(f"{prod.url}/api/events?token={token}").status_code == 401
    for job in [one, two]:
        finish(prod, job["id"], ALICE)


BAD_SUBJECTS: list[object] = ["", "two words", "x" * 129, "ü", "a/b", "a\nb", 5, ["u1"], {}]


def test_an_invalid_subject_is_refused_and_changes_nothing(make_stack: StackFactory) -> None:
    s = make_stack(webs=1, workers=0, **PRODUCTION)
    submit_as(s, ALICE, subject="u1")  # something stored to compare with
    before = store_snapshot(s)
    for bad in BAD_SUBJECTS:
        refusals = [
            http.post(
                f"{s.url}/api/jobs",
                json={"task": "analyze_document", "input": {"text": DOC}, "subject": bad},
                headers={"Idempotency-Key": "bad-subject", **ALICE},
            ),
            http.post(
                f"{s.url}/api/batches",
                json={"task": "analyze_document", "inputs": [{"text": DOC}], "subject": bad},
                headers=ALICE,
            ),
            http.post(f"{s.url}/api/events/token", json={"subject": bad}, headers=ALICE),
        ]
        for response in refusals:
            assert response.status_code == 422, (bad, response.text)
            error = response.json()["error"]
            assert error["details"]["fields"] == ["subject"] and "`subject`" in error["message"]
    for bad in ["two words", "x" * 129, "a/b"]:
        response = http.get(f"{s.url}/api/jobs", params={"subject": bad}, headers=ALICE)
        assert response.status_code == 400 and response.json()["error"]["code"] == "bad_subject"
    assert store_snapshot(s) == before
    # The longest subject allowed, and every character the rule lists, are accepted.
    fine = "Az09._:@+|=-" + "x" * 116
    assert submit_as(s, ALICE, subject=fine)["subject"] == fine


def test_the_python_clients_submit_list_and_mint_tokens_for_a_subject(prod: Stack) -> None:
    key = ALICE["Authorization"].removeprefix("Bearer ")
    with Client(prod.url, api_key=key) as client:
        job = client.submit("analyze_document", {"text": DOC}, subject="py-1")
        assert job.subject == "py-1"
        assert [j.id for j in client.list(subject="py-1").jobs] == [job.id]
        assert [j.id for j in client.iter_jobs(subject="py-1")] == [job.id]
        token = client.stream_token(subject="py-1")
        assert token.scope == "subject:py-1"
        assert http.get(f"{prod.url}/api/jobs/{job.id}?token={token.token}").status_code == 200
        assert client.stream_token(job.id).scope == f"job:{job.id}"
        assert client.stream_token().scope == "events"
        with pytest.raises(ValueError):
            client.stream_token(job.id, subject="py-1")
        assert client.wait(job.id, timeout=30).state == "completed"

    async def from_async() -> None:
        async with AsyncClient(prod.url, api_key=key) as client:
            job = await client.submit("analyze_document", {"text": DOC}, subject="py-2")
            assert [j.id async for j in client.iter_jobs(subject="py-2")] == [job.id]
            token = await client.stream_token(subject="py-2")
            assert token.scope == "subject:py-2"
            assert (await client.wait(job.id, timeout=30)).state == "completed"

    asyncio.run(from_async())
