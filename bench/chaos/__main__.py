"""``python -m bench.chaos``: start the stack, run the load and the faults, then check and
report (the package's docstring says what the soak does)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bench.chaos
from bench.chaos.invariants import check, rss_did_not_grow
from bench.chaos.load import Load, drain
from bench.chaos.plan import inject_faults
from bench.chaos.record import Run
from bench.chaos.report import fmt_rss, report, rss_table
from bench.chaos.stack import Stack, measure_rss


async def soak(stack: Stack, run: Run, args: argparse.Namespace) -> dict[str, int]:
    load = Load(stack, run, args.in_flight, args.watchers)
    stop_faults = asyncio.Event()
    submitter = asyncio.create_task(load.submitter())
    watchers = [asyncio.create_task(load.watcher()) for _ in range(args.watchers)]
    await asyncio.sleep(min(10.0, args.seconds / 6))
    baseline = measure_rss(stack)  # warm: the stack has run jobs for a while
    print(f"  baseline RSS (MiB): {fmt_rss(baseline)}", flush=True)
    enough = asyncio.Event()
    faults = asyncio.create_task(
        inject_faults(
            stack, run, stop_faults, (args.fault_min, args.fault_max), enough, args.min_faults
        )
    )
    try:
        await asyncio.sleep(args.seconds)
        # A loaded machine makes each fault slower (a replacement starts slower, a SIGTERM
        # waits out its worker's jobs): go on until the run has injected what it was asked to.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), timeout=2 * args.seconds)
    finally:
        stop_faults.set()
        await asyncio.wait_for(faults, timeout=60)
        load.stopping.set()
        print("  faults stopped; waiting for the jobs to end", flush=True)
        await asyncio.wait_for(submitter, timeout=90)
    await asyncio.to_thread(stack.reap, run)
    await asyncio.to_thread(drain, stack, run, args.drain)
    _, still = await asyncio.wait(watchers, timeout=60)
    for task in still:
        task.cancel()
    await asyncio.sleep(3)  # let the processes settle before the last figures
    return baseline


@contextmanager
def log_dir(keep: bool, run: Run) -> Iterator[Path]:
    """The processes' logs: kept when asked, or when the soak found a violation."""
    path = Path(tempfile.mkdtemp(prefix="stepstream-chaos-"))
    try:
        yield path
    finally:
        if keep or run.violations:
            print(f"logs kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=(bench.chaos.__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=300, help="how long faults are injected")
    parser.add_argument("--webs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=24, help="jobs kept in flight")
    parser.add_argument("--watchers", type=int, default=10)
    parser.add_argument(
        "--fault-min", type=float, default=3.0, help="seconds between faults, least"
    )
    parser.add_argument("--fault-max", type=float, default=7.0, help="seconds between faults, most")
    parser.add_argument(
        "--min-faults",
        type=int,
        default=0,
        help="go on past --seconds until this many faults are in (3 x --seconds at most)",
    )
    parser.add_argument("--drain", type=float, default=120, help="longest wait for jobs to end")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="the log plane on a 3-primary, 3-replica Valkey Cluster; primaries SIGKILLed too",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    random.seed(seed)
    run = Run(cluster=args.cluster)
    figures = {"jobs": 0, "events": 0}
    started = time.monotonic()
    print(
        f"chaos soak: {args.seconds:.0f} s, {args.webs} webs, {args.workers} workers, "
        f"{args.in_flight} jobs in flight, {args.watchers} watchers, seed {seed}"
        + (", logs on a 3+3 Valkey Cluster" if args.cluster else ""),
        flush=True,
    )
    with log_dir(args.keep_logs, run) as logs:
        stack = Stack(logs, args.webs, args.workers, cluster=args.cluster)
        try:
            stack.start()
            baseline = asyncio.run(soak(stack, run, args))
            figures = check(stack, run)
            if args.cluster and not run.faults["primary_sigkill"]:
                # A run with no failover proved nothing about one.
                run.violations.append("0 primary kills: no cluster failover was tested")
            rss_table(rss_did_not_grow(stack, run, baseline))
            for name, log_tail in run.unexpected_exits:
                run.violations.append(f"{name} exited by itself; its log ends:\n{log_tail}")
        except KeyboardInterrupt:
            print("interrupted: stopping every process", file=sys.stderr)
            return 130
        finally:
            stack.close()
        report(run, figures, seed, time.monotonic() - started)
    return 1 if run.violations else 0


if __name__ == "__main__":
    sys.exit(main())
