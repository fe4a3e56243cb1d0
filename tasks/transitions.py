"""The state transitions a job makes, named once: what the metrics count.

A transition is counted by the store's append script (tasks/store.py) in the same call that
writes it, and only when that call's compare-and-set on the state succeeds: whichever process
writes it (a web process, a worker, a recurring tick), it is counted exactly once, and a call
sent again after its reply was lost (its ``append_op`` mark) is not counted again. Counters are
one hash per transition with the task as the field (``Keys.transitions``), and the same in
15-minute windows that expire after a day (``Keys.transitions_window``), for /api/stats.

A create counts ``submitted``, and the transition of the state it is created in when that is
past ``queued``: a cached result is created ``completed``, a batch's parent ``running``
(``started``). A job that goes back to ``queued`` (a manual retry, an answered input) is not
submitted again: that append counts nothing.
"""

from __future__ import annotations

from stepstream.tasks.models import JobState

# The counters, in the order /metrics lists them. ``retried``: the job moved to ``retrying``
# (an attempt failed and another follows, or its worker stopped and hands it back).
COUNTERS = ("submitted", "started", "retried", "waiting", "completed", "failed", "cancelled")

# The counter of each state a job moves into.
BY_STATE: dict[JobState, str] = {
    JobState.scheduled: "submitted",
    JobState.queued: "submitted",
    JobState.running: "started",
    JobState.retrying: "retried",
    JobState.waiting: "waiting",
    JobState.completed: "completed",
    JobState.failed: "failed",
    JobState.cancelled: "cancelled",
}

# The event that records each transition in a job's log (``submitted``: its first ``queued``;
# a later one, a manual retry, is none): what a job's log says it was counted for.
EVENT_TYPES = {
    "submitted": "queued",
    "started": "started",
    "retried": "retrying",
    "waiting": "waiting",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}

WINDOW_SECONDS = 15 * 60
DAY_SECONDS = 24 * 3600
# A window is read for a day after it closes, then it is of no use.
WINDOW_TTL = DAY_SECONDS + 2 * WINDOW_SECONDS


def made(mode: str, state: str | None) -> tuple[str, ...]:
    """The counters an append in ``mode`` (``"create"`` or an update) that writes ``state``
    (None: the state does not change) adds one to, if it succeeds."""
    counter = BY_STATE[JobState(state)] if state is not None else None
    if mode == "create":
        return ("submitted",) if counter in (None, "submitted") else ("submitted", counter)
    if counter is None or counter == "submitted":
        return ()
    return (counter,)


def window_start(at: float) -> int:
    return int(at // WINDOW_SECONDS) * WINDOW_SECONDS


def day_windows(now: float) -> list[int]:
    """The windows that cover the last 24 h (the oldest one may start up to 15 min earlier)."""
    last = window_start(now)
    first = window_start(now - DAY_SECONDS)
    return list(range(first, last + 1, WINDOW_SECONDS))
