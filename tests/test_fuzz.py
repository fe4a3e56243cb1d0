"""Property-based fuzzing of every endpoint of a live server: no 500, no hang."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Stack

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
task_names = st.sampled_from(["analyze_document", "generate_quote", "nope", "", "counted"])
inputs = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"text": st.text(max_size=200)},
        optional={
            "pace": st.floats(allow_nan=False, allow_infinity=False, min_value=-5, max_value=0.01),
            "title": st.text(max_size=50),
            "chunk_words": st.integers(),
            "fail_at": st.text(max_size=20),
        },
    ),
    st.fixed_dictionaries(
        {
            "roles": st.lists(
                st.fixed_dictionaries(
                    {"role": st.text(max_size=20)},
                    optional={"level": st.text(max_size=8), "count": st.integers()},
                ),
                max_size=3,
            ),
            "weeks": st.integers(),
        }
    ),
)
bodies = st.one_of(
    st.builds(lambda t, i: {"task": t, "input": i}, task_names, inputs),
    json_values,
)
raw_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
ids = st.one_of(st.just("x"), st.text(alphabet="abcdefXYZ0123456789_-", min_size=1, max_size=30))
header_values = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40)

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# Slow: hypothesis sends hundreds of generated requests to a live server.
pytestmark = pytest.mark.slow


def assert_sane(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.request.url, response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["code"], response.text


@pytest.fixture(scope="module")
def client(make_stack_module: Stack) -> Any:
    # JSON's Content-Type on every request, so the bodies reach the JSON parser (a body of
    # another type is refused with 415 before it is read).
    json_type = {"Content-Type": "application/json"}
    with httpx.Client(base_url=make_stack_module.url, timeout=10, headers=json_type) as http:
        yield http


@FUZZ
@given(body=bodies, key=st.none() | header_values)
def test_submit_never_fails_the_server(client: httpx.Client, body: Any, key: str | None) -> None:
    headers = {"Idempotency-Key": key} if key is not None else {}
    assert_sane(client.post("/api/jobs", content=json.dumps(body), headers=headers))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_submit_with_arbitrary_bytes(client: httpx.Client, raw: bytes) -> None:
    assert_sane(client.post("/api/jobs", content=raw))


@FUZZ
@given(
    status=st.none() | raw_text,
    task=st.none() | raw_text,
    limit=st.none() | raw_text,
    cursor=st.none() | raw_text,
)
def test_listing_with_arbitrary_parameters(
    client: httpx.Client,
    status: str | None,
    task: str | None,
    limit: str | None,
    cursor: str | None,
) -> None:
    params = {
        k: v
        for k, v in {"status": status, "task": task, "limit": limit, "cursor": cursor}.items()
        if v is not None
    }
    assert_sane(client.get("/api/jobs", params=params))


@FUZZ
@given(job_id=ids, action=st.sampled_from(["", "/cancel", "/retry", "/token"]))
def test_job_endpoints_with_arbitrary_ids(client: httpx.Client, job_id: str, action: str) -> None:
    method = "GET" if action == "" else "POST"
    assert_sane(client.request(method, f"/api/jobs/{job_id}{action}"))


@FUZZ
@given(
    cursor=st.none() | header_values,
    after=st.none() | raw_text,
    token=st.none() | header_values,
    auth=st.none() | header_values,
)
def test_streams_with_arbitrary_cursors_and_credentials(
    client: httpx.Client,
    cursor: str | None,
    after: str | None,
    token: str | None,
    auth: str | None,
) -> None:
    headers = {}
    if cursor is not None:
        headers["Last-Event-ID"] = cursor
    if auth is not None:
        headers["Authorization"] = auth
    params = {k: v for k, v in {"after": after, "token": token}.items() if v is not None}
    for path in ["/api/events", "/api/jobs/nope/events"]:
        # A stream that opens is closed as soon as its headers arrive: only the status matters.
        with client.stream("GET", path, params=params, headers=headers) as response:
            assert response.status_code < 500
            if response.status_code >= 400:
                response.read()
                assert response.json()["error"]["code"]


def test_the_openapi_document_describes_every_route(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {"/api/jobs", "/api/jobs/{job_id}/events", "/api/events", "/api/tasks"} <= set(
        doc["paths"]
    )
    variants = doc["paths"]["/api/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert {v["title"] for v in variants["schema"]["oneOf"]} >= {"analyze_document"}
    assert all("subject" in v["properties"] for v in variants["schema"]["oneOf"])
    listing = {p["name"] for p in doc["paths"]["/api/jobs"]["get"]["parameters"]}
    assert "subject" in listing


@FUZZ
@given(
    body=st.one_of(
        json_values,
        st.builds(
            lambda t, items, budget: {"task": t, "inputs": items, "budget": budget},
            task_names,
            st.lists(inputs, max_size=3),
            st.none() | st.floats(allow_nan=False) | st.text(max_size=5),
        ),
    ),
    delay=st.none() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=10),
)
def test_batches_and_scheduling_options(client: httpx.Client, body: Any, delay: Any) -> None:
    assert_sane(client.post("/api/batches", content=json.dumps(body)))
    job = {"task": "analyze_document", "input": {"text": "A."}, "delay": delay}
    assert_sane(client.post("/api/jobs", content=json.dumps(job)))


@FUZZ
@given(
    url=st.one_of(
        json_values,
        st.text(max_size=60),
        st.builds(
            lambda scheme, host, rest: f"{scheme}://{host}{rest}",
            st.sampled_from(["http", "https", "HTTP", "ftp", "javascript", ""]),
            st.text(max_size=30),
            st.text(max_size=20),
        ),
    )
)
def test_callback_urls(client: httpx.Client, url: Any) -> None:
    job = {"task": "counted", "input": {}, "callback_url": url}
    response = client.post("/api/jobs", content=json.dumps(job))
    assert_sane(response)
    if response.status_code == 422:
        assert response.json()["error"]["details"]["field"] == "callback_url" or url is None


@FUZZ
@given(subject=st.none() | raw_text | json_values)
def test_any_subject_is_accepted_or_refused_cleanly(client: httpx.Client, subject: Any) -> None:
    job = {"task": "analyze_document", "input": {"text": "A."}, "subject": subject}
    submitted = client.post("/api/jobs", content=json.dumps(job))
    assert_sane(submitted)
    if submitted.status_code == 202:
        assert submitted.json()["subject"] == subject
    assert_sane(client.post("/api/events/token", content=json.dumps({"subject": subject})))
    if isinstance(subject, str):
        listed = client.get("/api/jobs", params={"subject": subject})
        assert_sane(listed)
        if listed.status_code == 200 and subject:  # an empty filter is no filter
            assert {j["subject"] for j in listed.json()["jobs"]} <= {subject}
