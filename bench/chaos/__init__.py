"""The chaos soak: a stack under load while its processes are killed, paused and restarted, then
checked against the promises the docs make (docs/reliability.md).

    python -m bench.chaos --seconds 300

It starts a Valkey (append-only file on), ``--webs`` web processes and ``--workers`` arq workers,
keeps a mix of jobs in flight (paced, flaky, failing on purpose, cancelled mid-run, small
batches, delayed; every submit with an ``Idempotency-Key``, retried with the same key on a 503
or a dropped connection), follows their streams with watchers that reconnect to any web process
with their cursor, and injects a fault every few seconds: SIGKILL or SIGTERM of a worker,
SIGKILL of a web process, a Valkey restart, a Valkey pause (SIGSTOP); with ``--cluster`` the
log plane is on a 3-primary, 3-replica Valkey Cluster (the Valkey keeps arq's queue), and a
primary's SIGKILL is added (its replica promoted, the node restarted as a replica). Then it
stops the faults, lets every job end (bounded), checks the invariants (docs/reliability.md)
against what is stored and what the watchers saw, and prints each violation with the job id
and its log.
Exit code 0 only without a violation.

The modules: ``record`` (what the run saw), ``stack`` (the processes, and the faults they
take), ``plan`` (which fault, and when), ``load`` (the jobs submitted, answered, cancelled and
watched), ``invariants`` (the checks), ``report`` (what is printed), ``__main__`` (the command).
"""
