"""/metrics and /api/stats with real processes: two web processes, two workers, real jobs."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StackFactory
from tests.support import http
from tests.support.api import submit, wait_state
from tests.support.processes import wait_until
from tests.support.sse import StreamReader
from tests.support.tasks import gate_key

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base: str) -> Samples:
    response = http.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def stats(base: str) -> dict[str, Any]:
    response = http.get(f"{base}/api/stats", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_counters_and_stats_move_as_jobs_run_on_two_webs_and_two_workers(
    make_stack: StackFactory,
) -> None:
    s = make_stack(webs=2, workers=2, STEPSTREAM_WORKER_HEARTBEAT_SECONDS="0.5")
    a, b = s.webs
    wait_until(lambda: stats(a.url)["workers_alive"] == 2, timeout=10, what="two heartbeats")

    inputs: list[dict[str, Any]] = [{}, {}, {}, {}, {"permanent_failure": True}]
    jobs = [submit((a, b)[i % 2].url, "counted", data) for i, data in enumerate(inputs)]
    readers = {
        web.url: [
            StreamReader(f"{web.url}/api/jobs/{job['id']}/events", {"Last-Event-ID": "0"}).start()
            for job in jobs
        ]
        for web in (a, b)
    }
    logs = {url: [r.wait_closed(timeout=60) for r in rs] for url, rs in readers.items()}
    # Every event reached the clients of both web processes, in the same order.
    for on_a, on_b, data in zip(logs[a.url], logs[b.url], inputs, strict=True):
        assert [e.id for e in on_a] == [e.id for e in on_b]
        assert on_a[-1].type == ("failed" if data else "completed")
    # A worker reports its running jobs in its heartbeat (every 0.5 s here) and counts a job's
    # end just after writing it: both may trail the streams by up to one beat.
    wait_until(
        lambda: all(w["running"] == [] for w in stats(a.url)["workers"]),
        timeout=5,
        what="the heartbeats to show no running job",
    )

    for web in (a, b):
        m = scrape(web.url)
        # Cluster-wide: the same on every web process, whichever took the submission.
        assert value(m, "stepstream_jobs_submitted_total", task="counted") == 5
        assert value(m, "stepstream_jobs_completed_total", task="counted") == 4
        assert value(m, "stepstream_jobs_failed_total", task="counted") == 1
        assert value(m, "stepstream_jobs_retried_total", task="counted") == 0
        count = "stepstream_job_duration_seconds_count"
        assert value(m, count, task="counted", outcome="completed") == 4
        assert value(m, count, task="counted", outcome="failed") == 1
        bucket = "stepstream_job_duration_seconds_bucket"
        assert value(m, bucket, task="counted", outcome="completed", le="+Inf") == 4
        assert value(m, "stepstream_queue_depth") == 0
        assert value(m, "stepstream_workers_alive") == 2
        # Per process: what this web process's own clients received.
        delivered = sum(len(events) for events in logs[web.url])
        assert value(m, "stepstream_sse_events_delivered_total", stream="job") == delivered
        assert value(m, "stepstream_sse_slow_consumers_dropped_total") == 0
        assert value(m, "stepstream_redis_reconnects_total") == 0
        assert value(m, "stepstream_hub_connected") == 1
        assert value(m, "process_resident_memory_bytes") > 0

        st = stats(web.url)
        counted = st["tasks"]["counted"]
        assert counted["counts"]["completed"] == 4
        assert counted["counts"]["failed"] == 1
        assert counted["counts"]["queued"] == counted["counts"]["running"] == 0
        assert counted["failure_rate"] == 0.2
        assert counted["duration_p50"] is not None
        assert counted["duration_p95"] >= counted["duration_p50"]
        assert counted["queue_depth"] == 0
        assert st["total"]["counts"]["completed"] >= 4
        assert st["queue_depth"] == 0 and st["oldest_queued_age"] is None
        assert st["workers_alive"] == 2
        assert {w["running"] == [] for w in st["workers"]} == {True}

    # The streams ended with their jobs: no stream is left open on either process.
    for web in (a, b):
        wait_until(
            lambda web=web: value(scrape(web.url), "stepstream_sse_streams_open") == 0,
            timeout=10,
            what="streams to close",
        )


def test_queue_depth_and_oldest_wait_while_no_worker_runs(make_stack: StackFactory) -> None:
    s = make_stack(webs=1, workers=0, STEPSTREAM_WORKER_HEARTBEAT_SECONDS="0.5")
    jobs = [submit(s.url, "counted") for _ in range(3)]
    # The oldest job's wait grows while no worker runs.
    wait_until(
        lambda: (stats(s.url)["oldest_queued_age"] or 0) >= 0.4, timeout=10, what="a queued age"
    )

    st = stats(s.url)
    assert st["queue_depth"] == 3
    assert st["tasks"]["counted"]["counts"]["queued"] == 3
    assert st["tasks"]["counted"]["queue_depth"] == 3
    assert st["oldest_queued_age"] >= 0.4
    assert st["workers_alive"] == 0 and st["workers"] == []
    m = scrape(s.url)
    assert value(m, "stepstream_queue_depth") == 3
    assert value(m, "stepstream_jobs", task="counted", state="queued") == 3
    assert value(m, "stepstream_queue_oldest_age_seconds") >= 0.4
    assert value(m, "stepstream_jobs_submitted_total", task="counted") == 3
    assert value(m, "stepstream_workers_alive") == 0

    # A worker arrives: the queue drains and the counters follow.
    s.add_worker()
    for job in jobs:
        wait_state(s.url, job["id"], {"completed"}, timeout=30)
    st = stats(s.url)
    assert st["queue_depth"] == 0 and st["oldest_queued_age"] is None
    assert st["tasks"]["counted"]["counts"]["completed"] == 3
    assert st["workers_alive"] == 1
    m = scrape(s.url)
    assert value(m, "stepstream_jobs_completed_total", task="counted") == 3
    assert value(m, "stepstream_jobs", task="counted", state="queued") == 0


ALICE, BOB = "key-alice-0123456789", "key-bob-0123456789"
PRODUCTION = {
    "STEPSTREAM_MODE": "production",
    "STEPSTREAM_SECRET": "s" * 64,
    "STEPSTREAM_API_KEYS": f"alice:{ALICE},bob:{BOB}",
    "STEPSTREAM_WORKER_HEARTBEAT_SECONDS": "0.5",
}


def test_in_production_stats_need_a_key_and_show_only_the_callers_running_jobs(
    make_stack: StackFactory,
) -> None:
    s = make_stack(webs=1, workers=1, **PRODUCTION)
    assert http.get(f"{s.url}/api/stats", timeout=10).status_code == 401
    response = http.post(
        f"{s.url}/api/jobs",
        json={"task": "counted", "input": {"gate_at": "one"}},
        headers={"Authorization": f"Bearer {BOB}"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    def running(key: str) -> list[dict[str, Any]]:
        response = http.get(
            f"{s.url}/api/stats", headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        assert response.status_code == 200, response.text
        return [j for w in response.json()["workers"] for j in w["running"]]

    wait_until(lambda: len(running(BOB)) == 1, timeout=10, what="bob's job in a heartbeat")
    assert running(BOB)[0]["job_id"] == job_id
    assert running(ALICE) == [{"job_id": None, "task": "counted", "state": "running"}]
    # /metrics has counts by task and no job ids: it stays open for the scraper (see deploy.md).
    assert value(scrape(s.url), "stepstream_jobs", task="counted", state="running") == 1
    with s.redis() as r:
        r.rpush(gate_key(job_id), "go")
