"""tasks/settings.py: list settings written as ``a,b`` in the environment, read as lists."""

from __future__ import annotations

import os
import sys

import pytest

from stepstream.serve import configuration_problem
from stepstream.tasks.settings import Settings


def test_a_comma_separated_variable_is_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPSTREAM_TASK_MODULES", " app.jobs, ,reports ")
    monkeypatch.setenv("STEPSTREAM_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("STEPSTREAM_API_KEYS", "alice:k1,bob:k2")
    monkeypatch.setenv("STEPSTREAM_WEBHOOK_URL", "https://hooks.example/in")
    monkeypatch.setenv("STEPSTREAM_WEBHOOK_EVENTS", "failed,cancelled")
    monkeypatch.setenv("STEPSTREAM_WEBHOOK_ALLOWED_HOSTS", "hooks.internal:8443,10.0.0.0/8")
    settings = Settings()
    assert settings.task_modules == ["app.jobs", "reports"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.api_keys == ["alice:k1", "bob:k2"]
    assert settings.webhook_states == {"failed", "cancelled"}
    assert settings.webhook_allowed_hosts == ["hooks.internal:8443", "10.0.0.0/8"]
    assert not settings.loads_demo_tasks  # a module of the user's is named


def test_a_single_value_is_not_read_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings decodes list variables as JSON unless told not to."""
    monkeypatch.setenv("STEPSTREAM_CORS_ORIGINS", "https://a.example")
    monkeypatch.setenv("STEPSTREAM_TASK_MODULES", "")
    settings = Settings()
    assert settings.cors_origins == ["https://a.example"]
    assert settings.task_modules == [] and settings.loads_demo_tasks


def test_an_unknown_webhook_event_is_named() -> None:
    with pytest.raises(ValueError, match="unknown event"):
        Settings(webhook_events="failed,finished")


def test_the_clusters_seed_is_a_redis_server_no_webhook_may_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STEPSTREAM_CLUSTER_URL", "redis://10.0.0.9:7000")
    settings = Settings()
    assert settings.cluster_url == "redis://10.0.0.9:7000"
    assert "redis://10.0.0.9:7000" in settings.redis_urls  # the webhook policy refuses it


def test_the_cluster_may_have_several_seeds_of_one_scheme(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STEPSTREAM_CLUSTER_URL", "redis://10.0.0.9:7000, redis://10.0.0.8:7000")
    settings = Settings()
    assert settings.cluster_seeds == ("redis://10.0.0.9:7000", "redis://10.0.0.8:7000")
    assert set(settings.cluster_seeds) <= set(settings.redis_urls)
    with pytest.raises(ValueError, match="mixes redis:// and rediss://"):
        Settings(cluster_url="redis://10.0.0.9:7000,rediss://10.0.0.8:7000")
    with pytest.raises(ValueError, match="names database 2"):
        Settings(cluster_url="redis://10.0.0.9:7000,redis://10.0.0.8:7000/2")


def test_the_start_check_leaves_the_environment_and_the_import_path_alone() -> None:
    environ, path = dict(os.environ), list(sys.path)
    problem = configuration_problem("127.0.0.1", tasks="no_such_module_here", demo=False)
    assert problem is not None and "no_such_module_here" in problem
    assert dict(os.environ) == environ and sys.path == path
    assert "STEPSTREAM_TASK_MODULES" not in os.environ
