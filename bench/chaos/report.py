"""What the soak prints: its progress as it goes, the RSS table, and the violations and summary
at the end."""

from __future__ import annotations

import sys
import time
from collections import Counter

from bench.chaos.invariants import grew
from bench.chaos.record import Run


def fault(kind: str, victim: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} fault {kind} ({victim})", flush=True)


def fmt_rss(figures: dict[str, int]) -> str:
    return ", ".join(f"{n} {kib / 1024:.0f}" for n, kib in sorted(figures.items()))


def rss_table(rows: dict[str, tuple[int | None, int]]) -> None:
    print("\nRSS (MiB), baseline -> after the soak (a replaced worker's baseline: at its start)")
    for name, (before, after) in rows.items():
        shown = "-" if before is None else f"{before / 1024:.0f}"
        line = f"  {name:14} {shown:>6} -> {after / 1024:6.0f}"
        if before is not None and grew(before, after):
            line += "  <- grew"
        print(line)


def by_kind(counts: Counter[str]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))


def report(run: Run, figures: dict[str, int], seed: int, elapsed: float) -> None:
    subs = run.submissions
    kinds = Counter(s.kind for s in subs if s.accepted)
    gave_up = [s for s in subs if not s.accepted]
    reconnects = sum(w.reconnects for w in run.watches)
    print("\n== violations ==" if run.violations else "")
    for n, violation in enumerate(run.violations, 1):
        print(f"[{n}] {violation}")
    for note in run.notes:
        print(f"note: {note}")
    print("\n== summary ==")
    print(f"seed {seed}, {elapsed:.0f} s in all")
    print(f"faults injected: {sum(run.faults.values())} ({by_kind(run.faults)})")
    if run.cluster:
        print(f"primary kills: {run.faults['primary_sigkill']} (cluster failovers)")
    print(f"unexpected process exits: {len(run.unexpected_exits)}")
    print(
        f"submissions: {len(subs)}, accepted {sum(kinds.values())} ({by_kind(kinds)}), "
        f"not accepted {len(gave_up)}"
    )
    for sub in gave_up[:5]:
        print(f"  not accepted: {sub.kind} key {sub.key}: {sub.gave_up}")
    print(f"jobs checked: {figures['jobs']}, events: {figures['events']}")
    print(
        f"human input: {figures.get('waits', 0)} waits, {figures.get('answers', 0)} answered, "
        f"{figures.get('defaults', 0)} ended by a timeout's default"
    )
    print(f"watchers: {len(run.watches)} streams followed, {reconnects} connects")
    tally = run.tally
    print(
        f"gaps {tally['gaps']}, duplicates {tally['duplicates']}, lost jobs {tally['lost']}, "
        f"jobs stuck {tally['stuck']}"
    )
    print(f"violations: {len(run.violations)}")
    sys.stdout.flush()
