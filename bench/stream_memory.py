"""Where an idle stream's memory goes: a tracemalloc snapshot diff over N idle streams.

One web process runs as ``stepstream web`` does (uvicorn, our httptools protocol, uvloop), with
``tracemalloc`` on; SIGUSR1 makes it dump a snapshot. The driver opens a warm-up batch of
streams (caches, pools and first-time allocations), dumps, opens N more idle streams of one
queued job (no worker: nothing is sent but heartbeats), dumps again, and prints what the N
streams hold per stream: by module, and the top lines. Both kinds of stream, in production
mode with one API key: the key itself (``Authorization``), and one stream token per viewer.

    .venv/bin/python -m bench.stream_memory                  # N = 2,000 per kind
    .venv/bin/python -m bench.stream_memory --n 1000 --top 30

tracemalloc counts what Python allocates (objects, and uvloop's and httptools' buffers through
Python's allocators), not the kernel's socket buffers (not in RSS either) nor the allocator's
slack: RSS per stream (``bench.connections``) is the figure to size with; this says where it goes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

from bench.common import Bench, bench, machine, print_table, rss_kib, split, submit
from bench.connections import mint_tokens
from tests.support.processes import Uvicorn, wait_until


class ProbeWeb(Uvicorn):
    """A web process started by ``python -m bench.stream_memory serve``: tracemalloc on."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        super().__init__("bench.stream_memory", env, log_dir, name="probe")
        self.args = [sys.executable, "-m", "bench.stream_memory", "serve", "--port", str(self.port)]
        self.dumps = log_dir / f"probe-{self.port}"

    def dump(self, name: str) -> tracemalloc.Snapshot:
        assert self.proc is not None
        path = Path(f"{self.dumps}-{name}.snapshot")
        self.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: path.exists(), timeout=120, what=f"snapshot {name}")
        time.sleep(0.5)  # written whole (renamed into place)
        return tracemalloc.Snapshot.load(str(path))


def serve(port: int) -> None:
    """``stepstream web`` with tracemalloc, dumping a snapshot on SIGUSR1."""
    import uvicorn

    from stepstream.serve import WEB_APP
    from stepstream.server.protocol import http_protocol
    from stepstream.tasks.settings import get_settings

    tracemalloc.start(8)
    dumps = 0

    def dump(signum: int, frame: object) -> None:
        nonlocal dumps
        dumps += 1
        name = ("warm", "held")[min(dumps, 2) - 1] if dumps <= 2 else f"extra{dumps}"
        path = Path(os.environ["PROBE_DUMPS"] + f"-{name}.snapshot")
        tmp = path.with_suffix(".tmp")
        snapshot = tracemalloc.take_snapshot()
        snapshot.dump(str(tmp))
        tmp.rename(path)

    signal.signal(signal.SIGUSR1, dump)
    settings = get_settings()
    uvicorn.run(
        WEB_APP,
        host="127.0.0.1",
        port=port,
        http=http_protocol(settings.header_timeout_seconds, settings.max_header_bytes),
        timeout_keep_alive=5,
        log_level="warning",
    )


def where(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    return filename.rsplit("/", 2)[-1] if "/server/" in filename else filename.rsplit("/", 1)[-1]


def group(filename: str) -> str:
    for marker in ("stepstream/", "/server/", "/tasks/"):
        if marker in filename and "site-packages" not in filename:
            return "stepstream: " + filename.rsplit("/", 1)[-1]
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    return "stdlib: " + filename.rsplit("/", 1)[-1]


def open_streams(run: Bench, port: int, path: str, n: int, tokens: list[str] | None) -> None:
    gens = []
    first = 0
    for index, count in enumerate(split(n, max(1, n // 2500))):
        args = ["sse", "--port", str(port), "--path", path, "--count", str(count)]
        args += ["--ready-marker", "event: snapshot", "--deadline", "600"]
        if tokens is not None:
            file = run.log_dir / f"tokens-{port}-{index}-{secrets.token_hex(4)}.txt"
            file.write_text("\n".join(tokens[first : first + count]) + "\n", encoding="ascii")
            args += ["--tokens-file", str(file)]
        else:
            args += ["--header", f"Authorization: {run_key_header}"]
        first += count
        gens.append(run.loadgen(*args))
    results = [g.read() for g in gens]
    ready = sum(r["ready"] for r in results)
    if ready < n:
        raise RuntimeError(f"only {ready} of {n} streams ready: {results}")


run_key_header = ""


def measure(run: Bench, kind: str, n: int, warm: int, top: int) -> list[list[str]]:
    global run_key_header
    key = "sk_" + secrets.token_urlsafe(32)
    run_key_header = f"Bearer {key}"
    auth = {"Authorization": run_key_header}
    production = {
        "STEPSTREAM_MODE": "production",
        "STEPSTREAM_SECRET": secrets.token_hex(32),
        "STEPSTREAM_API_KEYS": f"app:{key}",
    }
    backend = run.web(**production)
    # tracemalloc slows the process down: a connect may wait past the default 5 s deadline.
    probe = ProbeWeb(
        run.env(**production, PROBE_DUMPS="", STEPSTREAM_REQUEST_DEADLINE_SECONDS="120"),
        run.log_dir,
    )
    probe.env["PROBE_DUMPS"] = str(probe.dumps)
    run.processes.append(probe)
    probe.start()
    assert probe.proc is not None
    job_id = submit(backend.url, "gated", {"events": 1}, auth)["id"]
    path = f"/api/jobs/{job_id}/events"
    tokens = None
    if kind == "token":
        tokens, _, _ = asyncio.run(mint_tokens(backend.url, job_id, auth, warm + n, 32))
    open_streams(run, probe.port, path, warm, tokens[:warm] if tokens else None)
    time.sleep(1)
    before = probe.dump("warm")
    rss_before = rss_kib(probe.proc.pid)
    open_streams(run, probe.port, path, n, tokens[warm:] if tokens else None)
    time.sleep(2)  # past a heartbeat or two: their allocations settle
    after = probe.dump("held")
    rss_after = rss_kib(probe.proc.pid)
    for gen in run.loadgens:
        gen.stop()
    run.loadgens.clear()
    run.stop(probe)
    run.stop(backend)

    diff = after.compare_to(before, "traceback")
    by_group: Counter[str] = Counter()
    by_line: Counter[str] = Counter()
    for stat in diff:
        frame = stat.traceback[-1]  # the most recent: where the allocation was made
        by_group[group(frame.filename)] += stat.size_diff
        # The first frame in our code or a library, not the allocator's own line.
        caller = stat.traceback[-2] if len(stat.traceback) > 1 else frame
        by_line[
            f"{where(frame.filename)}:{frame.lineno} < {where(caller.filename)}:{caller.lineno}"
        ] += stat.size_diff
    total = sum(by_group.values())
    print(
        f"\n{kind} streams: {n:,} held; traced {total / n / 1024:.2f} KiB per stream; "
        f"RSS (with tracemalloc's own traces) {(rss_after - rss_before) / n:.2f} KiB per stream"
    )
    rows = [[kind, g, f"{size / n:,.0f}"] for g, size in by_group.most_common(top) if size > 0]
    print_table(f"{kind}: bytes per idle stream, by module", ["kind", "module", "B/stream"], rows)
    lines = [[kind, g, f"{size / n:,.0f}"] for g, size in by_line.most_common(top) if size > 0]
    print_table(f"{kind}: bytes per idle stream, by line", ["kind", "line", "B/stream"], lines)
    return [[kind, f"{total / n / 1024:.2f}"]]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_memory", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    probe = sub.add_parser("serve")
    probe.add_argument("--port", type=int, required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--kinds", default="key,token")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.port)
        return
    print(f"machine: {machine()}")
    rows: list[list[str]] = []
    with bench() as run:
        for kind in args.kinds.split(","):
            rows += measure(run, kind, args.n, args.warm, args.top)
    print_table("Traced KiB per idle stream", ["kind", "KiB/stream"], rows)


if __name__ == "__main__":
    main()
