"""Per-unit costs on this machine, for the capacity model in docs/scaling.md.

1. **The store's appends** (today's product, one Valkey): ``--writers`` writer processes (each
   ``--concurrency`` coroutines calling the real append, ``JobStore.append_many``, ``--batch``
   events per call, as fast as they can) append ``--events`` events each. Printed: events/s, and
   the Valkey server's CPU per event.
2. **The web tier**: 1 to ``--webs`` web processes, ``--viewers`` clients spread over them, each
   watching one of ``--jobs`` fresh jobs, while ``--storm`` events are appended at ``--rate``
   over those jobs; plus one web process with no client at all. Printed: each web process's CPU
   per event it delivered, the idle one's CPU per event of the deployment, and Valkey's.
3. **The store on a cluster** (``STEPSTREAM_CLUSTER_URL``): the same writers calling the real
   append on jobs of a cluster's log plane (arq's queue on the standalone Valkey), against a
   Valkey Cluster of 1, 2 and 3 primaries (``--primaries``; no replicas), with one web process
   on the cluster and one viewer on each job. Printed: events/s, the events the viewers got,
   and per primary its share of the events and its CPU per event.
4. **Web processes on a cluster** (``--only cluster-web``): the same writers on a 3-primary
   cluster, and two web processes on it: one with no client, one with a client watching one
   of the jobs. Printed: each one's CPU per event of the deployment, and per event it
   delivered.

CPU is each process's on-CPU time (``/proc/PID/task/*/schedstat``), read before and after. A web
process's figure is "less rest": what it spends over the same time with no event (timers, the
event loop) is taken out. Two cores run everything here (writers, servers, web processes,
clients): the events/s are what this machine reaches, not what the servers could; the CPU per
event is the figure to scale from.

    .venv/bin/python -m bench.scale                                   # about a minute here
    .venv/bin/python -m bench.scale --events 20000 --writers 1,2,4,8 --webs 4 --viewers 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

from bench.common import Bench, bench, fmt, machine, print_table
from bench.idle import Viewer, cpu_ns, jobs, storm
from tests.support.cluster import ValkeyCluster
from tests.support.processes import ROOT, wait_until

T = TypeVar("T")

# Writers wait this long for each other (imported, connected) before they write.
START_DELAY = 3.0

# -- writer processes --------------------------------------------------------------------------


class WriterProcess:
    """``python -m bench.scale --write ...``: appends, then prints one JSON line."""

    def __init__(self, args: list[str], log_dir: Path) -> None:
        self._err: IO[bytes] = open(log_dir / f"writer-{id(self)}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.scale", "--write", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self._err.close()
        if self.proc.returncode != 0:
            err = Path(self._err.name).read_text(errors="replace")[-2_000:]
            raise RuntimeError(f"writer exited {self.proc.returncode}:\n{err}")
        result: dict[str, Any] = json.loads(out)
        return result


def run_writers(
    arguments: list[str], count: int, log_dir: Path, read: Callable[[], T]
) -> tuple[int, float, T]:
    """``count`` writers started together and writing from one moment on: their total events,
    the span from the first one's start to the last one's end, and what ``read`` (CPU times)
    gave at that moment."""
    moment = time.time() + START_DELAY
    argv = [*arguments, "--start-at", f"{moment:.3f}"]
    writers = [WriterProcess(argv, log_dir) for _ in range(count)]
    try:
        time.sleep(max(0.0, moment - time.time()))
        at_start = read()
        results = [writer.result(timeout=300) for writer in writers]
    finally:
        for writer in writers:
            if writer.proc.poll() is None:
                writer.proc.kill()
                writer.proc.wait(timeout=10)
    events = sum(int(r["events"]) for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return events, span, at_start


async def _wait_for(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.time()))


async def write_store(
    url: str,
    ids: list[str],
    events: int,
    batch: int,
    concurrency: int,
    moment: float,
    cluster_url: str = "",
) -> None:
    """The real append (``bench.idle.storm``, unpaced), from ``moment``; the logs on
    ``cluster_url`` if given."""
    await _wait_for(moment)
    start = time.time()
    await storm(url, ids, events, batch, rate=1e12, writers=concurrency, cluster_url=cluster_url)
    print(json.dumps({"events": events - events % batch, "start": start, "end": time.time()}))


# -- 1. the store's appends ------------------------------------------------------------------


def valkey_pid(run: Bench) -> int:
    return int(run.valkey.server._process.pid)


def store_appends(
    run: Bench, writers: list[int], events: int, batch: int, concurrency: int
) -> None:
    rows = []
    for count in writers:
        ids = asyncio.run(jobs(run.valkey.url, 20 * count))
        ids_file = run.log_dir / f"ids-{count}.json"
        ids_file.write_text(json.dumps(ids))
        pid = valkey_pid(run)
        args = [
            "store",
            "--url",
            run.valkey.url,
            "--ids-file",
            str(ids_file),
            "--events",
            str(events),
            "--batch",
            str(batch),
            "--concurrency",
            str(concurrency),
        ]
        appended, span, before = run_writers(args, count, run.log_dir, partial(cpu_ns, pid))
        spent = (cpu_ns(pid) - before) / 1e9
        rows.append(
            [
                str(count),
                fmt(appended),
                fmt(appended / span, 0),
                fmt(spent / appended * 1e6, 1),
                fmt(spent / span * 100, 0),
            ]
        )
    print_table(
        f"The store's appends, one Valkey ({batch} event(s) per append call, "
        f"{concurrency} coroutines per writer process)",
        ["writer processes", "events", "events/s", "Valkey µs CPU per event", "Valkey CPU %"],
        rows,
    )


# -- 2. the web tier -------------------------------------------------------------------------


def web_tier(
    run: Bench, max_webs: int, viewers: int, job_count: int, events: int, rate: float, batch: int
) -> None:
    events -= events % (batch * job_count)
    per_job = events // job_count
    idle = run.web()
    webs = []
    rows = []
    for m in range(1, max_webs + 1):
        webs.append(run.web())
        ids = asyncio.run(jobs(run.valkey.url, job_count))  # fresh: no backlog to replay
        with opened([Viewer(webs[i % m].port, ids[i % job_count]) for i in range(viewers)]) as vs:
            pids = {f"web {i + 1}": w.proc.pid for i, w in enumerate(webs)}  # type: ignore[union-attr]
            pids["idle web"] = idle.proc.pid  # type: ignore[union-attr]
            pids["valkey"] = valkey_pid(run)
            rest_span = min(2.0, events / rate)
            rest = {name: cpu_ns(pid) for name, pid in pids.items()}
            time.sleep(rest_span)
            rest = {name: (cpu_ns(pid) - rest[name]) / rest_span for name, pid in pids.items()}
            before = {name: cpu_ns(pid) for name, pid in pids.items()}
            started = time.perf_counter()
            asyncio.run(storm(run.valkey.url, ids, events, batch, rate, writers=4))
            wait_until(
                lambda: all(v.frames >= per_job for v in vs),
                timeout=120,
                what="every viewer to receive its job's events",
            )
            span = time.perf_counter() - started
            spent = {
                name: (cpu_ns(pid) - before[name] - rest[name] * span) / 1e9
                for name, pid in pids.items()
            }
            for i in range(m):
                mine = [v for k, v in enumerate(vs) if k % m == i]
                delivered = sum(v.frames for v in mine)
                cpu = spent[f"web {i + 1}"]
                rows.append(
                    [
                        str(m),
                        f"web {i + 1}",
                        str(len(mine)),
                        fmt(delivered),
                        fmt(cpu * 1000, 0),
                        fmt(cpu / delivered * 1e6, 1),
                        "",
                    ]
                )
            cpu = spent["idle web"]
            rows.append(
                [str(m), "idle web", "0", "0", fmt(cpu * 1000, 0), "", fmt(cpu / events * 1e6, 2)]
            )
            cpu = spent["valkey"]
            rows.append(
                [
                    str(m),
                    "valkey",
                    "",
                    fmt(events),
                    fmt(cpu * 1000, 0),
                    fmt(cpu / events * 1e6, 1),
                    "",
                ]
            )
    print_table(
        f"The web tier: {viewers} viewers of {job_count} jobs spread over 1 to {max_webs} web "
        f"processes; {events:,} events at {rate:,.0f}/s ({batch} per append call)",
        [
            "web processes",
            "process",
            "viewers",
            "events delivered",
            "CPU ms (less rest)",
            "µs CPU per delivered event",
            "µs per deployment event",
        ],
        rows,
    )


@contextmanager
def opened(viewers: list[Viewer]) -> Iterator[list[Viewer]]:
    try:
        for viewer in viewers:
            if not viewer.opened.wait(20):
                raise RuntimeError("a viewer's stream did not open")
        yield viewers
    finally:
        for viewer in viewers:
            viewer.close()


# -- 3. the store's command mix on a cluster ---------------------------------------------------


@dataclass
class PrimaryUse:
    cpu_ns: int
    xadds: int


def primary_use(cluster: ValkeyCluster) -> list[PrimaryUse]:
    use = []
    for shard in cluster.shards:
        with shard.primary.client() as client:
            stats: Any = client.info("commandstats").get("cmdstat_xadd", {})
        assert shard.primary.proc is not None
        use.append(PrimaryUse(cpu_ns(shard.primary.proc.pid), int(stats.get("calls", 0))))
    return use


def store_args(url: str, ids_file: Path, events: int, concurrency: int, cluster: str) -> list[str]:
    args = ["store", "--url", url, "--ids-file", str(ids_file), "--events", str(events)]
    return [*args, "--concurrency", str(concurrency), "--cluster-url", cluster]


def cluster_store(
    run: Bench, primaries: list[int], writers: int, events: int, concurrency: int, jobs_n: int
) -> None:
    rows = []
    for count in primaries:
        cluster = ValkeyCluster(run.log_dir / f"cluster-{count}", primaries=count, replicas=0)
        cluster.start()
        web = None
        try:
            ids = asyncio.run(jobs(run.valkey.url, jobs_n, cluster.url))
            ids_file = run.log_dir / f"cluster-{count}-ids.json"
            ids_file.write_text(json.dumps(ids))
            web = run.web(STEPSTREAM_CLUSTER_URL=cluster.url)
            args = store_args(run.valkey.url, ids_file, events, concurrency, cluster.url)
            with opened([Viewer(web.port, job_id) for job_id in ids]) as viewers:
                appended, span, before = run_writers(
                    args, writers, run.log_dir, partial(primary_use, cluster)
                )
                after = primary_use(cluster)
                with contextlib.suppress(TimeoutError):
                    wait_until(
                        lambda: sum(v.frames for v in viewers) >= appended,  # noqa: B023
                        timeout=60,
                        what="the viewers to receive every event",
                    )
                delivered = sum(v.frames for v in viewers)
        finally:
            if web is not None:
                web.stop()
            cluster.stop()
        total = max(1, sum(u.xadds for u in after) - sum(u.xadds for u in before))
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            share = (a.xadds - b.xadds) / total
            spent = (a.cpu_ns - b.cpu_ns) / 1e9
            rows.append(
                [
                    str(count),
                    fmt(appended / span, 0) if i == 0 else "",
                    f"{fmt(delivered)} of {fmt(appended)}" if i == 0 else "",
                    f"primary {i + 1}",
                    f"{share:.0%}",
                    fmt(spent / max(1.0, share * appended) * 1e6, 1),
                    fmt(spent / span * 100, 0),
                ]
            )
    print_table(
        f"The store on a cluster (the real append, one event per call; the queue on one Valkey): "
        f"{writers} writer processes x {concurrency} coroutines over {jobs_n} jobs, one viewer "
        "on each through one web process",
        [
            "primaries",
            "events/s",
            "delivered",
            "primary",
            "share of events",
            "µs CPU per event",
            "CPU %",
        ],
        rows,
    )


# -- 4. web processes on a cluster -----------------------------------------------------------

CLUSTER_JOBS = 50  # jobs the cluster writers spread their events over


def cluster_web(run: Bench, writers: int, events: int, concurrency: int) -> None:
    cluster = ValkeyCluster(run.log_dir / "cluster-web", primaries=3, replicas=0).start()
    try:
        ids = asyncio.run(jobs(run.valkey.url, CLUSTER_JOBS, cluster.url))
        ids_file = run.log_dir / "cluster-web-ids.json"
        ids_file.write_text(json.dumps(ids))
        idle = run.web(STEPSTREAM_CLUSTER_URL=cluster.url)
        watching = run.web(STEPSTREAM_CLUSTER_URL=cluster.url)
        pids = {"idle web": idle.proc.pid, "web, 1 viewer": watching.proc.pid}  # type: ignore[union-attr]
        per_writer = len(range(0, events, CLUSTER_JOBS))  # the writers' events of ids[0]
        with opened([Viewer(watching.port, ids[0])]) as viewers:
            rest_span = 2.0
            rest = {name: cpu_ns(pid) for name, pid in pids.items()}
            time.sleep(rest_span)
            rest = {name: (cpu_ns(pid) - rest[name]) / rest_span for name, pid in pids.items()}
            args = store_args(run.valkey.url, ids_file, events, concurrency, cluster.url)
            appended, span, (started, before) = run_writers(
                args,
                writers,
                run.log_dir,
                lambda: (time.perf_counter(), {name: cpu_ns(pid) for name, pid in pids.items()}),
            )
            wait_until(
                lambda: viewers[0].frames >= per_writer * writers,
                timeout=60,
                what="the viewer to receive its job's events",
            )
            elapsed = time.perf_counter() - started
            spent = {
                name: (cpu_ns(pid) - before[name] - rest[name] * elapsed) / 1e9
                for name, pid in pids.items()
            }
            delivered = viewers[0].frames
    finally:
        cluster.stop()
    rows = []
    for name, cpu in spent.items():
        mine = delivered if name != "idle web" else 0
        rows.append(
            [
                name,
                fmt(mine),
                fmt(cpu * 1000, 1),
                fmt(cpu / appended * 1e6, 3),
                fmt(cpu / mine * 1e6, 1) if mine else "",
            ]
        )
    print_table(
        f"Web processes on a 3-primary cluster: {appended:,} events at {appended / span:,.0f}/s "
        f"over {CLUSTER_JOBS} jobs ({writers} writer processes x {concurrency} coroutines)",
        [
            "process",
            "events delivered",
            "CPU ms (less rest)",
            "µs per deployment event",
            "µs per delivered event",
        ],
        rows,
    )


# -- the command line --------------------------------------------------------------------------


def integers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--events", type=int, default=4_000, help="events per writer process")
    parser.add_argument("--writers", type=integers, default=[1, 2, 4], help="e.g. 1,2,4")
    parser.add_argument("--concurrency", type=int, default=8, help="coroutines per writer")
    parser.add_argument("--batch", type=int, default=1, help="events per append call")
    parser.add_argument("--webs", type=int, default=4, help="web processes, 1 to this")
    parser.add_argument("--viewers", type=int, default=20, help="clients, spread over the webs")
    parser.add_argument("--jobs", type=int, default=10, help="jobs the viewers watch")
    parser.add_argument("--storm", type=int, default=6_000, help="events of each web-tier run")
    parser.add_argument("--rate", type=float, default=2_000, help="the storm's events/s")
    parser.add_argument("--primaries", type=integers, default=[1, 2, 3], help="e.g. 1,2,3")
    parser.add_argument("--cluster-writers", type=int, default=2, help="writer processes")
    parser.add_argument("--cluster-jobs", type=int, default=20, help="jobs, each one viewer")
    parser.add_argument(
        "--only",
        choices=("store", "web", "cluster", "cluster-web"),
        help="run one of the parts (cluster-web: only with --only)",
    )
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--write", choices=("store",), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--cluster-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write == "store":
        ids = json.loads(args.ids_file.read_text())
        asyncio.run(
            write_store(
                args.url,
                ids,
                args.events,
                args.batch,
                args.concurrency,
                args.start_at,
                args.cluster_url,
            )
        )
        return
    print(f"# bench.scale — {machine()}")
    with bench(args.keep_logs) as run:
        if args.only in (None, "store"):
            store_appends(run, args.writers, args.events, args.batch, args.concurrency)
        if args.only in (None, "web"):
            web_tier(run, args.webs, args.viewers, args.jobs, args.storm, args.rate, args.batch)
        if args.only in (None, "cluster"):
            cluster_store(
                run,
                args.primaries,
                args.cluster_writers,
                args.events,
                args.concurrency,
                args.cluster_jobs,
            )
        if args.only == "cluster-web":
            cluster_web(run, args.cluster_writers, args.events, args.concurrency)


if __name__ == "__main__":
    main()
