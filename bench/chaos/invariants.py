"""The checks, one function per promise of docs/reliability.md, run once the soak is over
against what Valkey holds and what the submitters and watchers saw. Each appends what it finds
to ``run.violations``, a job's with the last events of its log."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from arq.constants import in_progress_key_prefix, job_key_prefix

from bench.chaos.record import TERMINAL, Run
from bench.chaos.stack import Stack, measure_rss
from stepstream.tasks import transitions
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.store import decode_record
from tests.support.processes import wait_until
from tests.support.tasks import COUNTED_STEPS, executions_key

# The steps each checkpointed task runs with ``ctx.run_step``: never again once completed.
CHECKPOINTED = {"counted": COUNTED_STEPS, "asks": ("before", "after")}
RSS_FACTOR, RSS_SLACK_KIB = 1.5, 64 * 1024  # growth flagged beyond 1.5 x baseline + 64 MiB

Log = list[tuple[str, dict[str, Any]]]  # (event id, event), as stored


@dataclass
class Evidence:
    """What the checks read: the run's record, and every job's record and log in Valkey."""

    stack: Stack
    run: Run
    r: Any  # redis.Redis, as Stack.redis
    keys: Keys
    records: dict[str, Any]  # JobRecord, or None for an id with no record
    logs: dict[str, Log]
    all_ids: list[str]  # every job the jobs index holds
    children_of: dict[str, list[str]]  # a batch's or a ctx.map parent's children
    known: set[str]  # the accepted jobs and their children

    def say(self, job_id: str, what: str) -> None:
        """A violation about one job, with the end of its log."""
        self.run.violations.append(f"{job_id}: {what}\n{excerpt(self.logs.get(job_id, []))}")

    def flag(self, what: str) -> None:
        """A violation about no one job."""
        self.run.violations.append(what)


def gather(stack: Stack, run: Run, r: Any) -> Evidence:
    keys = stack.keys
    accepted = run.accepted_ids()
    logs: dict[str, Log] = {}
    records: dict[str, Any] = {}
    # The job index: one on one Valkey, one per partition of the cluster's log plane.
    all_ids = [i for part in keys.every_partition() for i in r.zrange(part.jobs, 0, -1)]
    children_of: dict[str, list[str]] = {}
    for job_id in set(all_ids) | set(accepted):
        raw = r.hgetall(keys.job(job_id))
        records[job_id] = decode_record(raw) if raw else None
        logs[job_id] = [(i, json.loads(f["e"])) for i, f in r.xrange(keys.job_events(job_id))]
        record = records[job_id]
        if record is not None and (record.batch is not None or record.children is not None):
            children_of[job_id] = r.lrange(keys.batch_children(job_id), 0, -1)
    known = set(accepted) | {c for cs in children_of.values() for c in cs}
    return Evidence(stack, run, r, keys, records, logs, all_ids, children_of, known)


def check(stack: Stack, run: Run) -> dict[str, int]:
    """Every invariant, in the order their violations are listed; returns the run's figures."""
    r = stack.redis()
    try:
        if stack.cluster is not None:
            queue_outboxes_drained(stack, run, r)
        evidence = gather(stack, run, r)
        one_job_per_key(evidence)
        no_stray_jobs(evidence)
        rerun_steps = 0
        for job_id, record in evidence.records.items():
            if record is None or (job_id not in evidence.known):
                continue
            log = evidence.logs[job_id]
            for invariant in PER_JOB:
                invariant(evidence, job_id, record, log)
            rerun_steps += check_steps(job_id, record, log, r, evidence.say)
        if rerun_steps:
            run.notes.append(
                f"{rerun_steps} completed steps of uncheckpointed tasks (ctx.step) ran again in a "
                "later run (expected: only ctx.run_step is skipped on a re-run)"
            )
        watchers_saw_the_log(evidence)
        children_not_orphaned(evidence)
        parents_hold_their_children(evidence)
        batch_counts_match(evidence)
        transition_counters_match(evidence)
        unfinished_set_is_exact(evidence)
    finally:
        r.close()
    return figures(evidence)


# -- submissions -----------------------------------------------------------------------------


def one_job_per_key(e: Evidence) -> None:
    """No accepted submission is missing; a key never maps to two jobs."""
    for sub in e.run.submissions:
        if len(sub.ids) > 1:
            e.flag(f"key {sub.key} ({sub.kind}) answered with {len(sub.ids)} jobs: {sub.ids}")
        for job_id in sub.ids:
            if e.records.get(job_id) is None:
                e.run.tally["lost"] += 1
                e.say(job_id, f"accepted ({sub.kind}, key {sub.key}) but no record")


def no_stray_jobs(e: Evidence) -> None:
    """Every job is one an answer named (or a child of one). A submission retried until it gave
    up may have made its job all the same (its answers lost): then strays are a note."""
    strays = [i for i in e.all_ids if i not in e.known]
    unanswered = [s for s in e.run.submissions if (s.gave_up or "").startswith("no answer")]
    if strays and not unanswered:
        for job_id in strays:
            e.say(job_id, "a job no accepted submission answered with (a duplicate?)")
    elif strays:
        e.run.notes.append(f"{len(strays)} jobs from {len(unanswered)} submits that got no answer")


# -- each job's log --------------------------------------------------------------------------


def one_terminal_event(e: Evidence, job_id: str, record: Any, log: Log) -> None:
    """Exactly one terminal event, and the last."""
    types = [event["type"] for _, event in log]
    terminals = [n for n, t in enumerate(types) if t in TERMINAL]
    if len(terminals) != 1:
        e.say(job_id, f"{len(terminals)} terminal events (state {record.state.value})")
    elif terminals[0] != len(types) - 1:
        e.say(job_id, f"events after the terminal {types[terminals[0]]}")


def ended_as_logged(e: Evidence, job_id: str, record: Any, log: Log) -> None:
    """No job is stuck, and its record's state is its log's terminal event."""
    terminals = [event["type"] for _, event in log if event["type"] in TERMINAL]
    if record.state.value not in TERMINAL:
        e.run.tally["stuck"] += 1
        e.say(
            job_id,
            f"never ended: state {record.state.value}\n{whereabouts(e.stack, job_id)}",
        )
    elif terminals and terminals[-1] != record.state.value:
        e.say(job_id, f"record says {record.state.value}, log ends {terminals[-1]}")


def last_event_id_is_the_logs(e: Evidence, job_id: str, record: Any, log: Log) -> None:
    if log and record.last_event_id != log[-1][0]:
        e.say(job_id, f"record's last_event_id {record.last_event_id} is not {log[-1][0]}")


def ids_increase(e: Evidence, job_id: str, record: Any, log: Log) -> None:
    ids = [tuple(map(int, i.split("-"))) for i, _ in log]
    if any(b <= a for a, b in itertools.pairwise(ids)):
        e.say(job_id, "event ids not strictly increasing")


PerJob = Callable[[Evidence, str, Any, Log], None]
# In this order for each job, so its violations read as its log does.
PER_JOB: tuple[PerJob, ...] = (
    one_terminal_event,
    ended_as_logged,
    last_event_id_is_the_logs,
    ids_increase,
)


def check_steps(job_id: str, record: Any, log: Log, r: Any, say: Any) -> int:
    """No step completes twice within one run (the events between two ``started``); for the
    checkpointed tasks (``counted``, and ``asks``, which waits for input between its steps and
    so runs from the top again after the answer), a completed step never runs again, and every
    execution of a step's body follows a stored ``step`` event (so executions <= begins).
    Returns how many completed steps of an uncheckpointed task ran again (not a violation)."""
    run_index = 0
    per_run: Counter[tuple[int, str]] = Counter()
    begins: Counter[str] = Counter()
    fresh_completions: Counter[str] = Counter()
    completed_once: set[str] = set()
    for _, event in log:
        kind = event["type"]
        if kind == "started":
            run_index += 1
        step = event.get("step", {}).get("name") if isinstance(event.get("step"), dict) else None
        if kind == "step" and step:
            begins[step] += 1
            if step in completed_once and step in CHECKPOINTED.get(record.task, ()):
                say(job_id, f"checkpointed step {step!r} began again after it completed")
        if kind == "step_completed" and step:
            per_run[(run_index, step)] += 1
            if per_run[(run_index, step)] == 2:
                say(job_id, f"step {step!r} completed twice in run {run_index}")
            if not event.get("restored"):
                fresh_completions[step] += 1
                completed_once.add(step)
    checkpointed = CHECKPOINTED.get(record.task)
    if checkpointed is None:
        # ``async with ctx.step()`` is not checkpointed: a re-run does the step again. Counted,
        # not a violation (docs/reliability.md).
        return sum(n - 1 for n in fresh_completions.values() if n > 1)
    executions = {k: int(n) for k, n in r.hgetall(executions_key(job_id)).items()}
    for step in checkpointed:
        if fresh_completions[step] > 1:
            say(job_id, f"checkpointed step {step!r} ran to completion {fresh_completions[step]}x")
        if executions.get(step, 0) > begins[step]:
            say(
                job_id,
                f"step {step!r} executed {executions[step]}x but began {begins[step]}x in the log",
            )
    return 0


# -- what the watchers saw -------------------------------------------------------------------


def watchers_saw_the_log(e: Evidence) -> None:
    """Every watcher's sequence is a contiguous slice of the log: no gap, no duplicate."""
    for watch in e.run.watches:
        log_ids = [i for i, _ in e.logs.get(watch.job_id, [])]
        for problem in watch.problems:
            e.say(watch.job_id, f"watcher (webs {sorted(watch.webs)}): {problem}")
        if watch.start_after is None:
            continue
        expected = [i for i in log_ids if watch.start_after == "0" or _after(i, watch.start_after)]
        if watch.seen != expected[: len(watch.seen)]:
            dup = len(watch.seen) != len(set(watch.seen))
            e.run.tally["duplicates" if dup else "gaps"] += 1
            e.say(
                watch.job_id,
                f"watcher from {watch.start_after} (webs {sorted(watch.webs)}, "
                f"{watch.reconnects} connects) saw {len(watch.seen)} events that are not "
                f"the log's {'(duplicates)' if dup else '(a gap or reorder)'}: "
                f"first difference at {_first_difference(watch.seen, expected)}",
            )


# -- the two planes --------------------------------------------------------------------------


def queue_outboxes_drained(stack: Stack, run: Run, r: Any, timeout: float = 30) -> None:
    """On a cluster, every partition's queue outbox empties (docs/scaling.md, "Two planes"):
    what a script left for the queue plane (an enqueue, an owner's place given back) is run by
    the process that wrote it or, within seconds, by a worker's drain."""
    outboxes = [part.queue_outbox for part in stack.keys.every_partition()]

    def left() -> dict[str, list[str]]:
        return {key: fields for key in outboxes if (fields := r.hkeys(key))}

    with suppress(TimeoutError):
        wait_until(lambda: not left(), timeout=timeout, interval=0.5, what="queue outboxes")
    for key, fields in left().items():
        run.violations.append(f"{key}: {len(fields)} entries never drained: {fields[:3]}")


# -- parents and their children --------------------------------------------------------------


def children_not_orphaned(e: Evidence) -> None:
    """A job's children (ctx.map) have a parent, and none runs on after it ended."""
    for job_id, record in e.records.items():
        if record is None or record.parent is None:
            continue
        parent = e.records.get(record.parent)
        if parent is None:
            e.say(job_id, f"orphaned: its parent {record.parent} has no record")
        elif parent.state.value in TERMINAL and record.state.value not in TERMINAL:
            e.say(job_id, f"orphaned: {record.state.value}, its parent {parent.state.value}")


def parents_hold_their_children(e: Evidence) -> None:
    """One child per input, none twice, and the parent's result is theirs in input order."""
    for parent_id, children in e.children_of.items():
        parent = e.records[parent_id]
        if parent_id not in e.known or parent is None or parent.children is None:
            continue
        if len(children) != len(set(children)) or len(children) != parent.input.get("count"):
            e.say(parent_id, f"{len(children)} children for {parent.input.get('count')} inputs")
        if parent.state.value != "completed":
            continue
        kids = sorted(
            (c for c in (e.records.get(i) for i in children) if c is not None),
            key=lambda c: c.parent_index or 0,
        )
        truth = [
            c.result["square"] if c.state.value == "completed" and c.result else None for c in kids
        ]
        if parent.result.get("squares") != truth:
            e.say(parent_id, f"result {parent.result.get('squares')}, children's {truth}")


def batch_counts_match(e: Evidence) -> None:
    """A batch's counts equal its children's states."""
    for parent_id, children in e.children_of.items():
        if parent_id not in e.known:
            continue
        parent = e.records[parent_id]
        if parent is None or parent.batch is None:
            continue
        states = Counter(
            record.state.value if (record := e.records.get(c)) is not None else "missing"
            for c in children
        )
        counts = parent.batch or {}
        truth = {k: states.get(k, 0) for k in TERMINAL}
        truth["done"] = sum(truth.values())
        stored = {k: int(counts.get(k, 0)) for k in truth}
        if stored != truth:
            e.say(parent_id, f"batch counts {stored}, children {dict(states)}")


# -- counters --------------------------------------------------------------------------------


def transition_counters_match(e: Evidence) -> None:
    """Every transition counter equals the transitions in the logs (tasks/transitions.py): the
    append script counts what it writes, whatever was killed around it."""
    from_logs: Counter[tuple[str, str]] = Counter()
    for job_id in e.all_ids:
        record = e.records.get(job_id)
        if record is None:
            continue
        types = [event["type"] for _, event in e.logs[job_id]]
        from_logs["submitted", record.task] += 1
        for name, event_type in transitions.EVENT_TYPES.items():
            if name != "submitted":
                from_logs[name, record.task] += types.count(event_type)
    counted: Counter[tuple[str, str]] = Counter()
    for name in transitions.COUNTERS:
        for part in e.keys.every_partition():  # summed over a cluster's partitions
            for task, n in e.r.hgetall(part.transitions(name)).items():
                counted[name, task] += int(n)
    for name, task in sorted(set(from_logs) | set(counted)):
        if from_logs[name, task] != counted[name, task]:
            e.flag(
                f"{name} of {task}: counted {counted[name, task]}, "
                f"the logs have {from_logs[name, task]}"
            )


def unfinished_set_is_exact(e: Evidence) -> None:
    """The owner's unfinished set is exactly the non-terminal records; a batch's parent holds no
    place (a job waiting for its children does). On a cluster that is the set in the owner's
    home partition (tasks/places.py), where a place taken by a web process killed before its
    create stays until a refusal drops it (a note: no record, so no job is in it)."""
    unfinished = set(e.r.zrange(e.keys.owner_home(None).owner_unfinished(None), 0, -1))
    if e.stack.cluster is not None:
        never_made = {i for i in unfinished if i not in e.records}
        never_made = {i for i in never_made if not e.r.exists(e.keys.job(i))}
        if never_made:
            e.run.notes.append(
                f"{len(never_made)} places among the owner's unfinished jobs whose create never "
                "came (a web process killed between its reserve and its create)"
            )
        unfinished -= never_made
    open_records = {
        i for i, rec in e.records.items() if rec is not None and rec.state.value not in TERMINAL
    }
    open_records -= {i for i in e.children_of if (rec := e.records[i]) is not None and rec.batch}
    if unfinished != open_records:
        extra, missing = unfinished - open_records, open_records - unfinished
        e.flag(
            f"owner's unfinished set drifted: {len(unfinished)} held vs {len(open_records)} "
            f"open; held but ended {sorted(extra)[:5]}, open but not held {sorted(missing)[:5]}"
        )


def figures(e: Evidence) -> dict[str, int]:
    """The run's size, for the summary: jobs and events checked, and the human input."""
    events = [event for log in e.logs.values() for _, event in log]
    inputs = Counter(event.get("by") for event in events if event["type"] == "input")
    return {
        "jobs": len(e.known & set(e.records)),
        "events": len(events),
        "waits": sum(1 for event in events if event["type"] == "waiting"),
        "answers": sum(inputs.values()) - inputs["default"],
        "defaults": inputs["default"],
    }


# -- memory ----------------------------------------------------------------------------------


def grew(before: int, after: int) -> bool:
    return after > before * RSS_FACTOR + RSS_SLACK_KIB


def rss_did_not_grow(
    stack: Stack, run: Run, baseline: dict[str, int]
) -> dict[str, tuple[int | None, int]]:
    """No process's RSS grew past the allowance. Returns each process's (before, after) in
    KiB; a replaced worker's before is its RSS as it started (None: not measured)."""
    rows: dict[str, tuple[int | None, int]] = {}
    after = measure_rss(stack)
    for name in sorted(after):
        before = baseline.get(name, stack.started_rss.get(name))
        if before is not None and grew(before, after[name]):
            run.violations.append(
                f"{name}: RSS {before / 1024:.0f} MiB -> {after[name] / 1024:.0f} MiB"
            )
        rows[name] = (before, after[name])
    return rows


# -- excerpts --------------------------------------------------------------------------------


def excerpt(events: Log, limit: int = 14) -> str:
    lines = []
    for event_id, event in events[-limit:]:
        extra = ""
        if "step" in event and isinstance(event["step"], dict):
            extra = f" step={event['step'].get('name')}"
        if event.get("restored"):
            extra += " restored"
        if "error" in event and isinstance(event["error"], dict):
            extra += f" error={event['error'].get('type')}: {event['error'].get('message')}"
        lines.append(f"      {event_id} {event['type']} attempt={event.get('attempt')}{extra}")
    return "\n".join(lines)


def whereabouts(stack: Stack, job_id: str, lines: int = 12) -> str:
    """What arq holds for a job that never ended, and what the processes logged about it."""
    queue, log_plane = stack.queue_redis(), stack.redis()
    keys = stack.keys
    score = queue.zscore(keys.queue, job_id)
    entry = "none" if score is None else f"due in {(score - time.time() * 1000) / 1000:.1f}s"
    found = [
        f"      arq: queue entry {entry}, "
        f"in-progress key ttl {queue.pttl(in_progress_key_prefix + job_id)} ms, "
        f"job key {'present' if queue.exists(job_key_prefix + job_id) else 'none'}, "
        f"cancel flag {'set' if log_plane.exists(keys.job_cancel(job_id)) else 'none'}"
    ]
    queue.close()
    log_plane.close()
    for path in sorted(stack.log_dir.glob("*.log")):
        text = path.read_text(errors="replace").splitlines()
        hits = [n for n, line in enumerate(text) if job_id in line]
        found += [f"      {path.stem}: {text[n]}" for n in hits[-lines:]]
    return "\n".join(found)


def _after(a: str, b: str) -> bool:
    return tuple(map(int, a.split("-"))) > tuple(map(int, b.split("-")))


def _first_difference(seen: list[str], expected: list[str]) -> str:
    for n, (a, b) in enumerate(zip(seen, expected, strict=False)):
        if a != b:
            return f"#{n}: saw {a}, log has {b}"
    return f"#{min(len(seen), len(expected))}: saw {len(seen)}, log has {len(expected)}"
