"""Benchmarks of the delivery path, each against a baseline in the same run (docs/performance.md).

    .venv/bin/python -m bench.fanout        # N clients stream one job: latency, memory
    .venv/bin/python -m bench.connections   # idle streams one web process holds
    .venv/bin/python -m bench.polling       # polling GET /api/jobs/ID vs SSE
    .venv/bin/python -m bench.throughput    # submissions, appends, submit -> started
    .venv/bin/python -m bench.resume        # replay of missed events on reconnect
    .venv/bin/python -m bench.idle          # a web process's CPU per event it has no viewer for

Not part of the test suite. Every process a benchmark starts is stopped when it ends.
"""
