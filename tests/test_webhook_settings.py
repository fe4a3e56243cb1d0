"""Webhook settings live in every process: the web checks a callback_url with its own, a worker
delivers it with its own. Processes that disagree say so (log, /readyz, doctor); a delivery a
worker's settings refuse waits in the outbox until a worker whose settings allow it delivers
it, once and signed; production refuses webhooks without a secret; the allow-list takes ports,
and the Redis Stepstream uses is never a target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack, StackFactory
from tests.support import http
from tests.support.api import get_job, wait_state
from tests.support.processes import ROOT, Worker, free_port, wait_until
from tests.support.receiver import Receiver
from tests.test_jobs import store_snapshot

SECRET = "webhook-settings-test-secret"
FAST = {  # a refused attempt would come back quickly: nothing hides behind a long backoff
    "STEPSTREAM_WEBHOOK_TIMEOUT_SECONDS": "2",
    "STEPSTREAM_WEBHOOK_BACKOFF_SECONDS": "0.2",
    "STEPSTREAM_WORKER_HEARTBEAT_SECONDS": "0.5",
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def submit(base: str, **extra: Any) -> str:
    body = {"task": "counted", "input": {}, **extra}
    response = http.post(f"{base}/api/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def refused(base: str, callback_url: str) -> dict[str, Any]:
    body = {"task": "counted", "input": {}, "callback_url": callback_url}
    response = http.post(f"{base}/api/jobs", json=body, timeout=10)
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == "invalid_callback_url"
    return error


def webhooks_ready(s: Stack) -> dict[str, Any]:
    response = http.get(f"{s.url}/readyz", timeout=5)
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()["webhooks"]
    return view


def held(s: Stack) -> dict[str, dict[str, Any]]:
    with s.redis() as r:
        raw = r.hgetall(f"{s.prefix}webhooks:held")
    return {entry: json.loads(value) for entry, value in raw.items()}


def outbox_size(s: Stack) -> int:
    with s.redis() as r:
        return int(r.xlen(f"{s.prefix}webhooks"))


def doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepstream.doctor"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def worker_with(s: Stack, **env: str) -> Worker:
    worker = Worker({**s.env, **env}, s.log_dir).start()
    s.workers.append(worker)
    return worker


def test_a_worker_whose_settings_refuse_a_delivery_holds_it_until_a_worker_delivers_it_once(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    s = make_stack(
        webs=1,
        workers=0,
        STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        STEPSTREAM_WEBHOOK_SECRET=SECRET,
        **FAST,
    )
    # Started without the allow-list: the web accepts the callback, this worker refuses it.
    no_hosts = worker_with(s, STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="")
    wait_until(
        lambda: "webhook settings differ" in no_hosts.log(), timeout=10, what="its start line"
    )

    first = submit(s.url, callback_url=receiver.url("/first"))
    wait_state(s.url, first, {"completed"})
    wait_until(lambda: len(held(s)) == 1, timeout=10, what="the delivery held")
    (reason,) = held(s).values()
    assert (
        "STEPSTREAM_WEBHOOK_ALLOWED_HOSTS" in reason["reason"] and "127.0.0.1" in reason["reason"]
    )
    wait_until(lambda: "webhook held" in no_hosts.log(), timeout=10, what="its line")
    line = next(x for x in no_hosts.log().splitlines() if "webhook held" in x)
    assert first in line and "STEPSTREAM_WEBHOOK_ALLOWED_HOSTS" in line
    assert webhooks_ready(s)["held"] == 1
    assert "1 webhook delivery(ies) held" in doctor(s.env).stdout
    no_hosts.stop()

    # Next: the allow-list but no secret, while the web process has one. It does not send the
    # held event unsigned, nor a new one.
    unsigned = worker_with(s, STEPSTREAM_WEBHOOK_SECRET="")
    second = submit(s.url, callback_url=receiver.url("/second"))
    wait_state(s.url, second, {"completed"})
    wait_until(lambda: len(held(s)) == 2, timeout=10, what="the second delivery held")
    wait_until(
        lambda: "webhook held: this worker has no STEPSTREAM_WEBHOOK_SECRET" in unsigned.log(),
        timeout=10,
        what="its line",
    )
    wait_until(
        lambda: all("SECRET" in h["reason"] for h in held(s).values()),
        timeout=10,
        what="the unsigned worker to look at the first held delivery",
    )
    assert receiver.all() == []
    assert outbox_size(s) == 2
    unsigned.stop()

    # A worker with the web's settings delivers both, each once, signed, as attempt 1.
    s.add_worker()
    wait_until(lambda: len(receiver.accepted()) == 2, timeout=20, what="both delivered")
    wait_until(lambda: outbox_size(s) == 0, timeout=10, what="an empty outbox")
    assert held(s) == {}
    deliveries = {d.path: d for d in receiver.all()}
    assert set(deliveries) == {"/first", "/second"} and len(receiver.all()) == 2
    for path, job_id in (("/first", first), ("/second", second)):
        delivery = deliveries[path]
        assert delivery.signed_with(SECRET)
        assert delivery.event_id == f"{job_id}:{get_job(s.url, job_id)['last_event_id']}"
        assert delivery.headers["X-Stepstream-Attempt"] == "1"  # holding used no attempt
    wait_until(
        lambda: (
            webhooks_ready(s)
            == {
                "settings": "agree",
                "differing": [],
                "processes": 2,
                "held": 0,
            }
        ),
        timeout=10,
        what="/readyz to see agreement",
    )


def test_processes_that_disagree_on_webhook_settings_say_so_in_the_log_readyz_and_doctor(
    make_stack: StackFactory,
) -> None:
    s = make_stack(
        webs=1,
        workers=0,
        STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        STEPSTREAM_WEBHOOK_SECRET=SECRET,
        **FAST,
    )
    assert webhooks_ready(s)["settings"] == "agree"  # alone, it agrees with itself
    worker = worker_with(s, STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="", STEPSTREAM_WEBHOOK_SECRET="")
    # The worker, at its start.
    # One line per setting that differs, written one after the other: wait for both.
    wait_until(
        lambda: all(
            f"{name} differs" in worker.log()
            for name in ("STEPSTREAM_WEBHOOK_ALLOWED_HOSTS", "STEPSTREAM_WEBHOOK_SECRET")
        ),
        timeout=10,
        what="its lines",
    )
    lines = [x for x in worker.log().splitlines() if "webhook settings differ" in x]
    hosts = next(x for x in lines if "STEPSTREAM_WEBHOOK_ALLOWED_HOSTS differs" in x)
    assert "'127.0.0.1' in web" in hosts and "not set in worker" in hosts
    secret = next(x for x in lines if "STEPSTREAM_WEBHOOK_SECRET differs" in x)
    assert SECRET not in secret and "not set in worker" in secret
    # The web process, when it next compares.
    wait_until(
        lambda: "STEPSTREAM_WEBHOOK_ALLOWED_HOSTS differs" in s.webs[0].log(),
        timeout=10,
        what="the web's line",
    )
    # /readyz: the names only (it answers anyone), still ready.
    view = webhooks_ready(s)
    assert view["settings"] == "differ" and view["processes"] == 2
    assert view["differing"] == ["STEPSTREAM_WEBHOOK_ALLOWED_HOSTS", "STEPSTREAM_WEBHOOK_SECRET"]
    # The doctor: each value, with the processes that have it.
    checked = doctor(s.env)
    assert checked.returncode == 1, checked.stdout
    # Each value with its processes, in the order of the processes' ids (pids among them).
    hosts = next(
        x
        for x in checked.stdout.splitlines()
        if x.startswith("FAIL  webhook settings: STEPSTREAM_WEBHOOK_ALLOWED_HOSTS differs: ")
    )
    assert "'127.0.0.1' in web" in hosts and "not set in worker" in hosts
    assert "FAIL  webhook settings: STEPSTREAM_WEBHOOK_SECRET differs" in checked.stdout
    assert SECRET not in checked.stdout
    worker.stop()
    assert webhooks_ready(s)["settings"] == "agree"  # a stopped worker's announcement is gone
    assert doctor(s.env).returncode == 0


@pytest.mark.parametrize(
    "webhooks",
    [
        pytest.param({"STEPSTREAM_WEBHOOK_URL": "https://hooks.example.com/all"}, id="url"),
        pytest.param({"STEPSTREAM_WEBHOOK_ALLOWED_HOSTS": "10.1.2.3:8080"}, id="allowed-hosts"),
        pytest.param({"STEPSTREAM_WEBHOOK_ALLOW_PUBLIC": "true"}, id="allow-public"),
    ],
)
def test_production_with_webhooks_and_no_secret_stops_both_processes_with_one_plain_line(
    webhooks: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPSTREAM_")}
    env.update(
        webhooks,
        PYTHONPATH=str(ROOT),
        REDIS_URL="redis://127.0.0.1:1/0",
        STEPSTREAM_MODE="production",
        STEPSTREAM_SECRET="a-long-random-token-secret",
    )
    for args in (["worker"], ["web", "--host", "0.0.0.0", "--port", str(free_port())]):
        result = subprocess.run(
            [sys.executable, "-m", "stepstream.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 78, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "STEPSTREAM_WEBHOOK_SECRET is not set" in result.stderr


def test_in_production_without_a_secret_a_callback_url_is_refused_naming_the_setting(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    key = "ops:prod-webhook-key"
    s = make_stack(
        webs=1,
        workers=0,
        STEPSTREAM_MODE="production",
        STEPSTREAM_SECRET="a-long-random-token-secret",
        STEPSTREAM_API_KEYS=key,
    )
    before = store_snapshot(s)
    response = http.post(
        f"{s.url}/api/jobs",
        json={"task": "counted", "input": {}, "callback_url": "https://hooks.example.com/"},
        headers={"Authorization": f"Bearer {key.partition(':')[2]}"},
        timeout=10,
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_callback_url"
    assert "STEPSTREAM_WEBHOOK_SECRET" in error["message"]
    assert store_snapshot(s) == before


def test_a_callback_to_the_valkey_port_is_refused_even_when_the_allow_list_names_its_host(
    make_stack: StackFactory,
) -> None:
    s = make_stack(webs=1, workers=0, STEPSTREAM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1,localhost")
    port = s.valkey.port
    before = store_snapshot(s)
    for url in (
        f"http://127.0.0.1:{port}/",
        f"http://localhost:{port}/hook",
        f"http://127.0.0.2:{port}/",  # any loopback address reaches a server on 127.0.0.1
        f"http://[::ffff:127.0.0.1]:{port}/",
    ):
        error = refused(s.url, url)
        assert "a Redis server Stepstream uses" in error["message"], error
        assert error["details"]["field"] == "callback_url"
    assert store_snapshot(s) == before


def test_an_allow_entry_with_a_port_allows_that_port_only(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    port = receiver.server.server_address[1]
    s = make_stack(
        webs=1,
        workers=1,
        STEPSTREAM_WEBHOOK_ALLOWED_HOSTS=f"127.0.0.1:{port}",
        STEPSTREAM_WEBHOOK_SECRET=SECRET,
    )
    other = free_port()
    error = refused(s.url, f"http://127.0.0.1:{other}/hook")
    # The message names the allow-list setting: the operator's way to allow it.
    assert f"127.0.0.1:{other}" in error["message"]
    assert "STEPSTREAM_WEBHOOK_ALLOWED_HOSTS" in error["message"]
    job_id = submit(s.url, callback_url=receiver.url())
    wait_state(s.url, job_id, {"completed"})
    wait_until(lambda: len(receiver.accepted()) == 1, timeout=10, what="the delivery")
    assert receiver.accepted()[0].signed_with(SECRET)
