"""The job API: submit, read, list, tasks; every client mistake is a JSON 4xx and stores nothing."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import DOC, submit, wait_state
from tests.support.snapshot import key_value
from tests.support.tasks import gate_key

# Keys that move by themselves (worker heartbeats, metrics, rate counters): not job data.
HOUSEKEEPING = ("worker", "webhook-settings", "count:", "duration:", "durations:", "rate:")


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def store_snapshot(stack: Stack) -> dict[str, str]:
    """Every key of job data under the stack's prefix with a digest of its value."""
    r = stack.redis()
    out: dict[str, str] = {}
    for key in sorted(r.scan_iter(f"{stack.prefix}*")):
        if key.removeprefix(stack.prefix).startswith(HOUSEKEEPING):
            continue
        out[key] = key_value(r, key)
    return out


def test_submit_answers_202_with_record_location_and_links(stack: Stack) -> None:
    response = http.post(
        f"{stack.url}/api/jobs", json={"task": "analyze_document", "input": {"text": DOC}}
    )
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/api/jobs/{job['id']}"
    assert job["links"] == {
        "self": f"/api/jobs/{job['id']}",
        "events": f"/api/jobs/{job['id']}/events",
    }
    assert job["state"] == "queued" and job["task"] == "analyze_document"
    assert len(job["id"]) >= 20, "ids must be unguessable"
    done = wait_state(stack.url, job["id"], {"completed"})
    assert done["step"] == {"index": 7, "count": 7, "name": "Validating output"}
    assert done["progress"] == 1.0
    assert done["started_at"] and done["finished_at"]
    assert done["result"]["stats"]["sentences"] == 5


def test_the_quote_task_prices_a_team(stack: Stack) -> None:
    job = submit(
        stack.url,
        "generate_quote",
        {"roles": [{"role": "ml_engineer", "level": "senior", "count": 2}], "weeks": 46},
    )
    done = wait_state(stack.url, job["id"], {"completed"})
    result = done["result"]
    # Two senior ML engineers for a full working year: 2 × 104,000 plus 21% contributions.
    assert result["people_cost"] == pytest.approx(2 * 104_000 * 1.21)
    assert result["total"] == pytest.approx(result["people_cost"] + 2 * 46 * 35)
    assert len(done["steps"]) == 6


def test_tasks_lists_steps_and_input_schema(stack: Stack) -> None:
    tasks = {t["name"]: t for t in http.get(f"{stack.url}/api/tasks").json()["tasks"]}
    analyze = tasks["analyze_document"]
    assert len(analyze["steps"]) == 7 and analyze["steps"][1] == "Chunking document"
    assert "text" in analyze["input_schema"]["properties"]
    assert analyze["input_schema"]["required"] == ["text"]
    assert len(tasks["generate_quote"]["steps"]) == 6


def test_list_is_newest_first_with_filters_and_cursor_paging(make_stack: StackFactory) -> None:
    s = make_stack(webs=1, workers=1)
    ids = [submit(s.url, "analyze_document", {"text": DOC})["id"] for _ in range(5)]
    failing = submit(s.url, "generate_quote", {"roles": [{"role": "x"}], "weeks": 1})["id"]
    for job_id in ids:
        wait_state(s.url, job_id, {"completed"})
    wait_state(s.url, failing, {"failed"})
    everything = http.get(f"{s.url}/api/jobs").json()
    assert [j["id"] for j in everything["jobs"]] == [failing, *reversed(ids)]
    pages: list[str] = []
    cursor = None
    for _ in range(10):
        params = {"limit": "2", "task": "analyze_document"}
        if cursor:
            params["cursor"] = cursor
        page = http.get(f"{s.url}/api/jobs", params=params).json()
        pages.extend(j["id"] for j in page["jobs"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert pages == list(reversed(ids))
    failed = http.get(f"{s.url}/api/jobs", params={"status": "failed,cancelled"}).json()
    assert [j["id"] for j in failed["jobs"]] == [failing]
    assert failed["jobs"][0]["error"]["type"] == "PermanentError"
    assert "unknown role" in failed["jobs"][0]["error"]["message"]


def test_health_and_readiness(stack: Stack) -> None:
    assert http.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = http.get(f"{stack.url}/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] == "ok"


BAD_SUBMISSIONS = [
    pytest.param(b"{not json", 400, "malformed_json", id="malformed-json"),
    pytest.param(b"\xff\xfe", 400, "malformed_json", id="not-utf8"),
    pytest.param(b"[1, 2]", 422, "invalid_body", id="not-an-object"),
    pytest.param(b'{"input": {}}', 422, "invalid_body", id="no-task"),
    pytest.param(b'{"task": "nope", "input": {}}', 422, "unknown_task", id="unknown-task"),
    pytest.param(
        b'{"task": "analyze_document", "input": []}', 422, "invalid_input", id="input-not-object"
    ),
    pytest.param(
        b'{"task": "analyze_document", "input": {"text": ""}}', 422, "invalid_input", id="empty"
    ),
    pytest.param(
        b'{"task": "analyze_document", "input": {"text": "x", "pace": -1}}',
        422,
        "invalid_input",
        id="bad-field",
    ),
    pytest.param(
        b'{"task": "analyze_document", "input": {"text": "x", "reveiw": true}}',
        422,
        "invalid_input",
        id="unknown-input-field",
    ),
    pytest.param(
        b'{"task": "analyze_document", "input": {"text": "x"}, "extra": 1}',
        422,
        "invalid_body",
        id="unknown-field",
    ),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, 400, "malformed_json", id="nested-too-deep"),
    # Stored, half a surrogate pair broke every later response that carried the input.
    pytest.param(
        b'{"task": "analyze_document", "input": {"text": "\\ud800"}}',
        400,
        "malformed_json",
        id="lone-surrogate",
    ),
    pytest.param(
        b'{"task": "analyze_document", "input": {"text": "ok"}, "delay": 1' + b"0" * 400 + b"}",
        422,
        "invalid_body",
        id="delay-beyond-float",
    ),
    pytest.param(
        b'{"task": "analyze_document", "input": {"text": "ok"}, "budget": 1' + b"0" * 400 + b"}",
        422,
        "invalid_body",
        id="budget-beyond-float",
    ),
    pytest.param(b'{"a": "' + b"x" * 1_100_000 + b'"}', 413, "body_too_large", id="too-large"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_SUBMISSIONS)
def test_bad_submissions_are_4xx_and_store_nothing(
    make_stack_module: Stack, body: bytes, status: int, code: str
) -> None:
    s = make_stack_module
    before = store_snapshot(s)
    response = http.post(
        f"{s.url}/api/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert store_snapshot(s) == before


GOOD_SUBMIT = json.dumps({"task": "analyze_document", "input": {"text": "A. B."}}).encode()


@pytest.mark.parametrize(
    ("content_type", "path"),
    [
        ("text/plain", "/api/jobs"),
        ("text/plain;charset=UTF-8", "/api/batches"),
        ("application/x-www-form-urlencoded", "/api/jobs"),
        ("multipart/form-data; boundary=x", "/api/jobs"),
        (None, "/api/jobs"),
        ("text/plain", "/api/events/token"),
    ],
)
def test_a_body_that_is_not_sent_as_json_gets_415_and_changes_nothing(
    make_stack_module: Stack, content_type: str | None, path: str
) -> None:
    """A form or text/plain POST is one a page on any origin may send without a CORS
    preflight: the body is valid JSON, and still refused."""
    s = make_stack_module
    before = store_snapshot(s)
    headers = {"Content-Type": content_type} if content_type else {}
    body = GOOD_SUBMIT if "batches" not in path else b'{"task":"counted","inputs":[{}]}'
    response = http.post(f"{s.url}{path}", content=body, headers=headers)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert "application/json" in error["message"]
    assert error["details"] == {"expected": "application/json", "given": content_type}
    assert store_snapshot(s) == before


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.acme+json",
    ],
)
def test_json_content_types_are_accepted(make_stack_module: Stack, content_type: str) -> None:
    s = make_stack_module
    response = http.post(
        f"{s.url}/api/jobs", content=GOOD_SUBMIT, headers={"Content-Type": content_type}
    )
    assert response.status_code == 202, response.text
    # A token asked for with no body needs no Content-Type.
    token = http.post(f"{s.url}/api/jobs/{response.json()['id']}/token")
    assert token.status_code == 200, token.text
    wait_state(s.url, response.json()["id"], {"completed"})  # the stack's next test sees it idle


def test_error_details_name_the_fields_and_known_tasks(stack: Stack) -> None:
    unknown = http.post(f"{stack.url}/api/jobs", json={"task": "nope", "input": {}}).json()
    assert set(unknown["error"]["details"]["known_tasks"]) >= {"analyze_document", "generate_quote"}
    invalid = http.post(
        f"{stack.url}/api/jobs",
        json={"task": "generate_quote", "input": {"roles": [], "weeks": 0}},
    ).json()
    fields = {tuple(d["loc"]) for d in invalid["error"]["details"]}
    assert fields == {("roles",), ("weeks",)}


def test_a_body_without_content_length_is_limited_while_reading(
    make_stack_module: Stack,
) -> None:
    s = make_stack_module
    before = store_snapshot(s)

    def chunks() -> Iterator[bytes]:
        yield b'{"task": "analyze_document", "input": {"text": "'
        for _ in range(200):
            yield b"x" * 10_000
        yield b'"}}'

    response = http.post(
        f"{s.url}/api/jobs", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert store_snapshot(s) == before


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/api/jobs/does-not-exist", {}, 404, "job_not_found"),
        ("/api/jobs/../../etc", {}, 404, "not_found"),
        ("/api/jobs/%7Bx%7D", {}, 404, "job_not_found"),
        ("/api/jobs", {"status": "done"}, 400, "bad_status"),
        ("/api/jobs", {"limit": "0"}, 400, "bad_limit"),
        ("/api/jobs", {"limit": "abc"}, 400, "bad_limit"),
        ("/api/jobs", {"limit": "²"}, 400, "bad_limit"),
        ("/api/jobs", {"cursor": "!!!"}, 400, "bad_cursor"),
        ("/api/jobs", {"cursor": "bm9jb2xvbg"}, 400, "bad_cursor"),
        # "1000…000:abc" (400 digits): an integer no float holds.
        ("/api/jobs", {"cursor": _cursor("1" + "0" * 400 + ":abc")}, 400, "bad_cursor"),
        ("/api/jobs", {"limit": "1" * 5000}, 400, "bad_limit"),
        ("/api/events", {"after": "yesterday"}, 400, "bad_cursor"),
        ("/api/nothing", {}, 404, "not_found"),
    ],
)
def test_bad_reads_are_json_4xx(
    stack: Stack, path: str, params: dict[str, str], status: int, code: str
) -> None:
    response = http.get(f"{stack.url}{path}", params=params)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_wrong_method_is_405_json(stack: Stack) -> None:
    response = http.delete(f"{stack.url}/api/jobs")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_a_body_dripped_in_slowly_is_cut_off_with_408(make_stack: StackFactory) -> None:
    s = make_stack(STEPSTREAM_BODY_TIMEOUT_SECONDS="1")
    before = store_snapshot(s)
    port = int(s.url.rsplit(":", 1)[1])
    body = b'{"task": "analyze_document", "input": {"text": "slow"}}'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(
            b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        answer = b""
        conn.settimeout(0.3)
        started = time.monotonic()
        for byte in body[:-1]:  # never the last byte: only the timeout can end this
            conn.sendall(bytes([byte]))
            try:
                answer += conn.recv(4096)
            except TimeoutError:
                continue
            if answer:
                break
            assert time.monotonic() - started < 10, "no answer: the drip is still held"
        conn.settimeout(5)
        while chunk := conn.recv(4096):  # the rest of the answer, up to the server's close
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"body_timeout" in answer
    assert store_snapshot(s) == before


def test_headers_dripped_in_slowly_are_cut_off(make_stack: StackFactory) -> None:
    """uvicorn bounds neither the request line nor the headers; stepstream web does."""
    s = make_stack(STEPSTREAM_HEADER_TIMEOUT_SECONDS="1")
    port = int(s.url.rsplit(":", 1)[1])
    head = b"GET /api/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 60
    closed_after = None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.settimeout(0.2)
        started = time.monotonic()
        for byte in head:  # the head never ends: only the timeout can end this
            try:
                conn.sendall(bytes([byte]))
                if conn.recv(4096) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "the dripping head was held for the whole test"
    assert closed_after < 8  # 1 s allowed, generously


def test_a_slow_stream_is_not_cut_off_by_the_head_timeout(make_stack: StackFactory) -> None:
    s = make_stack(STEPSTREAM_HEADER_TIMEOUT_SECONDS="1")
    job = submit(s.url, "gated", {"events": 1})
    with http.stream("GET", f"{s.url}/api/jobs/{job['id']}/events", timeout=10) as stream:
        assert stream.status_code == 200
        time.sleep(2.5)  # past the head timeout, with the stream open and idle
        s.redis().rpush(gate_key(job["id"]), "go")
        text = ""
        for chunk in stream.iter_text():
            text += chunk
            if "event: completed" in text:
                break
    assert "event: completed" in text


def test_the_answer_to_a_submission_is_the_accepted_job_model_dumped() -> None:
    """The 202 (and an Idempotency-Key's 200) body is built from the record's own dump, not
    through ``AcceptedJob`` (the submit path's speed): the same bytes, field for field, for a
    record with every field set, as an idempotent repeat may find it."""
    from stepstream.server import bodies
    from stepstream.tasks.models import JobRecord

    record = JobRecord.model_validate(
        {
            "id": "abc",
            "task": "t",
            "owner": "o",
            "subject": "s",
            "state": "waiting",
            "input": {"text": "é\u2028", "n": [1, 2.5, None]},
            "step": {"index": 1, "count": 2, "name": "read"},
            "progress": 0.5,
            "message": "m",
            "steps": [{"index": 1, "name": "read", "state": "completed", "duration_ms": 3.5}],
            "attempt": 2,
            "max_attempts": 3,
            "error": {"type": "E", "message": "x", "retryable": True},
            "result": {"r": 1},
            "retry_at": "2026-01-01T00:00:00Z",
            "created_at": "2026-01-01T00:00:00Z",
            "started_at": "2026-01-01T00:00:01Z",
            "last_event_id": "1-0",
            "usage": {"calls": 1, "input_tokens": 2, "output_tokens": 3, "duration_ms": 4.5},
            "cost": 0.25,
            "budget": 1.0,
            "run_at": "2026-01-01T00:00:00Z",
            "batch_id": "b",
            "batch_index": 3,
            "parent": "p",
            "parent_index": 1,
            "depth": 1,
            "parent_group": "g",
            "parent_slots": 2,
            "children": {"size": 1},
            "waiting_for": {"name": "ok", "prompt": "?", "schema": {"type": "boolean"}},
            "answers": {"ok": {"value": True, "by": "token", "at": "2026-01-01T00:00:02Z"}},
            "callback_url": "https://example.com/hook",
            "trace": {"traceparent": "00-x-y-01"},
        }
    )
    token = {"stream_token": "t.s", "stream_token_expires_at": 1_796_637_659.0175507}
    model = bodies.AcceptedJob.of(record, "/root", **token)
    built = bodies.accepted_json(record, "/root", **token)
    assert bodies.ApiJSONResponse(built).body == bodies.json_response(model).body
    assert b"example.com" not in bodies.ApiJSONResponse(built).body  # never shown
