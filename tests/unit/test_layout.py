"""The package's layers as the processes load them, and the contracts that keep them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support.processes import ROOT


def _loaded_after(statement: str, cwd: Path) -> list[str]:
    """The stepstream, arq and redis modules a fresh interpreter holds after ``statement``."""
    code = (
        f"import sys; {statement}; import json; print(json.dumps(sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('stepstream', 'arq', 'redis'))))"
    )
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    modules: list[str] = json.loads(run.stdout)
    return modules


def test_the_job_models_load_without_the_runtime(tmp_path: Path) -> None:
    # What a web process or a script that reads job records pulls in with the models.
    loaded = _loaded_after("import stepstream.tasks.models", tmp_path)
    # stepstream._stream_id: the event-id type, pure (no I/O, no imports of its own).
    assert loaded == [
        "stepstream",
        "stepstream._stream_id",
        "stepstream.tasks",
        "stepstream.tasks.models",
    ]


def test_the_client_contract_names_every_private_client_module() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (client,) = [c for c in config["contracts"] if "stepstream._client" in c["source_modules"]]
    private = {f"stepstream.{path.stem}" for path in (ROOT / "stepstream").glob("_*.py")}
    assert set(client["source_modules"]) == private - {"stepstream.__init__"}
    assert set(client["forbidden_modules"]) == {"stepstream.server", "stepstream.tasks"}
