"""The ``stepstream`` command as a user runs it: a real process against a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepstream import Client, JobState
from stepstream.tasks.demo.analyze_document import STEPS as ANALYZE_DOCUMENT_STEPS
from stepstream.tasks.models import new_job_id
from tests.conftest import Stack, StackFactory
from tests.support.api import DOC
from tests.support.cli import LiveCli, run_cli, run_cli_in_terminal
from tests.support.processes import free_port, wait_until
from tests.support.sse import read_stream
from tests.support.tasks import gate_key

ANALYZE_STEPS = list(ANALYZE_DOCUMENT_STEPS)


def step_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("Step ")]


def expected_step_lines() -> list[str]:
    return [f"Step {i} of 7 · {name}" for i, name in enumerate(ANALYZE_STEPS, start=1)]


def result_after(lines: list[str], marker: str) -> object:
    """The JSON printed after the line starting with ``marker``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(marker))
    return json.loads("\n".join(lines[start + 1 :]))


def test_submit_watch_runs_a_job_to_completion_and_exits_0(stack: Stack, tmp_path: Path) -> None:
    body = tmp_path / "input.json"
    body.write_text(json.dumps({"text": DOC, "title": "From a file", "pace": 0.01}))
    done = run_cli(stack.url, "submit", "analyze_document", "--input", f"@{body}", "--watch")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Queued: job ")
    assert step_lines(lines) == expected_step_lines()
    assert "\r" not in done.stdout and "\033" not in done.stdout, "a pipe gets plain lines"
    result = result_after(lines, "Completed")
    assert isinstance(result, dict)
    assert result["title"] == "From a file" and result["keywords"]


def test_on_a_terminal_the_progress_bar_is_redrawn_in_place(stack: Stack) -> None:
    job_input = json.dumps({"text": DOC, "pace": 0.05})
    code, screen = run_cli_in_terminal(
        stack.url, "submit", "analyze_document", "-i", job_input, "--watch"
    )
    assert code == 0, screen
    redraws = screen.split("\r\x1b[K")
    assert len(redraws) > 10, "the bar line was not redrawn in place"
    assert any("Step 3 of 7 · Embedding chunks — Embedded 1 of 1" in line for line in redraws)
    assert any(line.startswith("[") and "100%" in line for line in redraws)
    # Each finished step stays on screen as a line of its own, once.
    done_lines = [line for line in screen.splitlines() if line.lstrip("\r\x1b[K").startswith("✓")]
    assert len(done_lines) == 7
    assert '"keywords"' in screen.split("Completed in")[-1]


def test_a_failing_job_exits_1_and_says_where_it_failed(stack: Stack) -> None:
    failing = json.dumps({"text": DOC, "fail_at": "Ranking chunks"})
    done = run_cli(stack.url, "submit", "analyze_document", "-i", failing, "--watch")
    assert done.returncode == 1, done.stdout + done.stderr
    # The demo fails inside "Ranking chunks", step 4: the steps up to it were shown.
    assert step_lines(done.stdout.splitlines()) == expected_step_lines()[:4]
    last = done.stdout.splitlines()[-1]
    assert last.startswith("Failed: PermanentError")
    assert "simulated failure at step 'Ranking chunks'" in last


def test_a_cancelled_job_exits_2(stack: Stack) -> None:
    submitted = run_cli(stack.url, "submit", "gated", "--input", '{"events": 2}')
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    watcher = LiveCli(stack.url, "watch", job_id)
    try:
        watcher.wait_for_line(lambda line: line == "Step 1 of 1 · emit")
        cancel = run_cli(stack.url, "cancel", job_id)
        assert cancel.returncode == 0, cancel.stderr
        assert "Cancel requested" in cancel.stdout
        assert watcher.wait(timeout=30) == 2
    finally:
        watcher.stop()
    assert watcher.lines[-1] == "Cancelled: cancelled by request"


@pytest.mark.slow  # kills, restarts or starts processes, or waits out retries
def test_an_unreachable_server_exits_3() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    for args in (["watch", "some-job"], ["submit", "analyze_document", "-i", "{}", "--watch"]):
        done = run_cli(nowhere, *args, timeout=30)
        assert done.returncode == 3, done.stderr
        assert "unreachable" in done.stderr and "cannot connect" in done.stderr
    # --url wins over $STEPSTREAM_URL.
    done = run_cli("http://127.0.0.1:9", "--url", nowhere, "get", "x", timeout=30)
    assert done.returncode == 3 and nowhere in done.stderr


@pytest.mark.slow  # restarts the web process
def test_watch_survives_a_web_server_restart_with_every_step_once(
    make_stack: StackFactory,
) -> None:
    s = make_stack(webs=1, workers=1)
    port = s.webs[0].port
    with Client(s.url) as client:
        job = client.submit("analyze_document", {"text": DOC, "pace": 0.4})
    watcher = LiveCli(s.url, "watch", job.id)
    try:
        watcher.wait_for_line(lambda line: line.startswith("Step 2 of 7"))
        s.webs[0].stop()  # the job runs on while no web server is up
        s.add_web(port=port)
        assert watcher.wait(timeout=60) == 0, watcher.stderr
    finally:
        watcher.stop()
    assert step_lines(watcher.lines) == expected_step_lines()
    assert sum(line.startswith("Completed") for line in watcher.lines) == 1
    result = result_after(watcher.lines, "Completed")
    assert isinstance(result, dict) and result["keywords"]


def test_json_output_is_the_jobs_log_line_by_line(stack: Stack) -> None:
    done = run_cli(
        stack.url, "submit", "generate_quote", "--watch", "--json",
        "--input", json.dumps({"roles": [{"role": "ml_engineer", "count": 2}], "weeks": 3}),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    job_id = lines[0]["data"]["job_id"]
    status, log = read_stream(f"{stack.url}/api/jobs/{job_id}/events?after=0")
    assert status == 200
    assert lines == [{"id": e.id, "type": e.type, "data": e.data} for e in log]
    assert lines[-1]["type"] == "completed" and lines[-1]["data"]["result"]["total"] > 0
    # Watching the finished job again from a cursor prints exactly what followed it.
    cursor = lines[3]["id"]
    again = run_cli(stack.url, "watch", job_id, "--json", "--after", cursor)
    assert again.returncode == 0
    assert [json.loads(line) for line in again.stdout.splitlines()] == lines[4:]


def test_ctrl_c_stops_watching_and_leaves_the_job_running(stack: Stack) -> None:
    with Client(stack.url) as client:
        job = client.submit("gated", {"events": 1})
        watcher = LiveCli(stack.url, "watch", job.id)
        try:
            watcher.wait_for_line(lambda line: line == "Step 1 of 1 · emit")
            watcher.interrupt()
            assert watcher.wait(timeout=20) == 130
        finally:
            watcher.stop()
        assert f"job {job.id} keeps running" in watcher.stderr
        assert client.get(job.id).state is JobState.running
        stack.redis().rpush(gate_key(job.id), "go")
        assert client.wait(job.id, timeout=30).state is JobState.completed


def test_refusals_exit_4_with_the_servers_message(stack: Stack) -> None:
    missing = run_cli(stack.url, "get", "no-such-job")
    assert missing.returncode == 4
    assert "no job with id 'no-such-job'" in missing.stderr

    invalid = run_cli(stack.url, "submit", "generate_quote", "-i", '{"roles": []}')
    assert invalid.returncode == 4
    assert "does not fit task 'generate_quote'" in invalid.stderr
    assert "roles: List should have at least 1 item" in invalid.stderr
    assert "weeks: Field required" in invalid.stderr

    unknown = run_cli(stack.url, "submit", "no_such_task")
    assert unknown.returncode == 4 and "known tasks: " in unknown.stderr

    bad_json = run_cli(stack.url, "submit", "analyze_document", "-i", "{text:")
    assert bad_json.returncode == 64 and "not valid JSON" in bad_json.stderr


def test_get_jobs_retry_and_cancel_of_a_finished_job(stack: Stack) -> None:
    failing = json.dumps({"text": DOC, "fail_at": "Parsing document"})
    submitted = run_cli(stack.url, "submit", "analyze_document", "-i", failing)
    job_id = submitted.stdout.strip()
    with Client(stack.url) as client:
        assert client.wait(job_id, timeout=30).state is JobState.failed

    shown = run_cli(stack.url, "get", job_id)
    assert shown.returncode == 0
    record = json.loads(shown.stdout)
    assert record["state"] == "failed"
    assert "simulated failure at step 'Parsing document'" in record["error"]["message"]

    listed = run_cli(stack.url, "jobs", "--status", "failed", "--task", "analyze_document")
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[0].split() == [
        "ID",
        "TASK",
        "STATE",
        "DONE",
        "CREATED",
        "STEP",
    ]
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows[job_id][1:3] == ["analyze_document", "failed"]
    as_json = run_cli(stack.url, "jobs", "--status", "running,completed", "--json", "--limit", "5")
    assert as_json.returncode == 0
    assert all(
        json.loads(line)["state"] in ("running", "completed")
        for line in as_json.stdout.splitlines()
    )

    # A retry fails the same way: it is queued again, runs from the start and exits 1.
    retried = run_cli(stack.url, "retry", job_id, "--watch")
    assert retried.returncode == 1, retried.stderr
    assert retried.stdout.splitlines()[0] == f"Queued again: job {job_id}"
    assert "  Started attempt 2 of 4" in retried.stdout.splitlines()

    conflict = run_cli(stack.url, "cancel", job_id)
    assert conflict.returncode == 4
    assert "cannot cancel a job that is failed" in conflict.stderr


def test_get_prints_a_waiting_jobs_schema_under_the_apis_own_name(stack: Stack) -> None:
    """`waiting_for.schema`, as the API and the docs name it (it printed `schema_`)."""
    with Client(stack.url) as client:
        job = client.submit("asks", {})
        wait_until(lambda: client.get(job.id).state is JobState.waiting, 30, what="the wait")
    shown = run_cli(stack.url, "get", job.id)
    assert shown.returncode == 0, shown.stderr
    waiting_for = json.loads(shown.stdout)["waiting_for"]
    assert waiting_for["name"] == "decision"
    assert "schema_" not in waiting_for
    assert "approved" in waiting_for["schema"]["properties"], waiting_for
    listed = run_cli(stack.url, "jobs", "--json", "--task", "asks", "--limit", "50")
    line = next(json.loads(row) for row in listed.stdout.splitlines() if job.id in row)
    assert line["waiting_for"]["schema"] == waiting_for["schema"]


def test_tail_follows_every_job(make_stack: StackFactory) -> None:
    s = make_stack(webs=1, workers=1)
    with Client(s.url) as client:
        first = client.submit("generate_quote", {"roles": [{"role": "ml_engineer"}], "weeks": 1})
        client.wait(first.id, timeout=30)
        tail = LiveCli(s.url, "tail", "--json", "--after", "0")
        try:
            tail.wait_for_line(lambda line: first.id in line and '"completed"' in line)
            second = client.submit(
                "generate_quote", {"roles": [{"role": "ml_engineer"}], "weeks": 2}
            )
            tail.wait_for_line(lambda line: second.id in line and '"completed"' in line)
            tail.interrupt()
            assert tail.wait(timeout=20) == 130
        finally:
            tail.stop()
    events = [json.loads(line) for line in tail.lines]
    assert {e["data"]["job_id"] for e in events} == {first.id, second.id}
    assert all(e["data"]["event_id"] for e in events)


def test_the_api_key_option_authenticates_in_production(make_stack: StackFactory) -> None:
    key = "key-carol-cli-0123456789"
    s = make_stack(
        webs=1,
        workers=1,
        STEPSTREAM_MODE="production",
        STEPSTREAM_SECRET="cli-tests-secret-0123456789abcdef",
        STEPSTREAM_API_KEYS=f"carol:{key}",
    )
    refused = run_cli(s.url, "jobs")
    assert refused.returncode == 4 and "credentials required" in refused.stderr
    done = run_cli(
        s.url,
        "--api-key",
        key,
        "submit",
        "analyze_document",
        "-i",
        json.dumps({"text": DOC}),
        "--watch",
    )
    assert done.returncode == 0, done.stderr
    assert step_lines(done.stdout.splitlines()) == expected_step_lines()


def test_no_job_id_reads_as_an_option_on_the_command_line() -> None:
    # An id starting with "-" made `stepstream get -B6W…` fail with a usage error (exit 64).
    ids = [new_job_id() for _ in range(5_000)]
    assert all(job_id[0].isalnum() for job_id in ids)
    assert all(len(job_id) == 20 for job_id in ids) and len(set(ids)) == len(ids)
