"""The stepstream command: run the server (up), and start, follow and manage jobs.

Exit codes of ``watch`` and ``submit --watch``: 0 completed, 1 failed, 2 cancelled,
3 server unreachable; 4 the server refused the request (unknown job, invalid input, conflict);
64 a mistake on the command line; 130 interrupted (Ctrl-C; the job keeps running).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from stepstream._client import Client
from stepstream._exceptions import APIError, ServerUnavailable, StepstreamError
from stepstream._models import (
    CancelledEvent,
    CompletedEvent,
    FailedEvent,
    Job,
    JobState,
    SnapshotEvent,
)
from stepstream._render import describe, make_renderer
from stepstream.serve import run_web, run_worker
from stepstream.up import run_up
from stepstream.valkey import DEFAULT_DATA_DIR as DEFAULT_VALKEY_DATA_DIR
from stepstream.valkey import DEFAULT_PORT as DEFAULT_VALKEY_PORT
from stepstream.valkey import run_valkey

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_USAGE = 64  # EX_USAGE: argparse's own 2 would read as "cancelled"
EXIT_INTERRUPTED = 130

STATE_EXIT_CODES = {
    JobState.completed: EXIT_COMPLETED,
    JobState.failed: EXIT_FAILED,
    JobState.cancelled: EXIT_CANCELLED,
}


class _Parser(argparse.ArgumentParser):
    usage_exit_code = EXIT_USAGE

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit_code, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: an option given before the command is not overwritten by the command's default.
    connection = _Parser(add_help=False)
    connection.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="the server (default: $STEPSTREAM_URL, else http://127.0.0.1:8000)",
    )
    connection.add_argument(
        "--api-key", default=argparse.SUPPRESS, help="sent as a bearer token ($STEPSTREAM_API_KEY)"
    )
    parser = _Parser(
        prog="stepstream",
        description=__doc__,
        parents=[connection],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up", help="start an embedded Valkey (unless REDIS_URL is set), the web server and a worker"
    )
    assert isinstance(up, _Parser)
    up.usage_exit_code = 2  # `up` behaves as it always has
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--data-dir", type=Path, default=Path(".data"))
    _add_task_options(up)

    valkey = commands.add_parser(
        "valkey",
        help="start the embedded Valkey alone, on a stable port, and print the REDIS_URL for "
        "your app, `stepstream web` and `stepstream worker`",
    )
    valkey.add_argument("--port", type=int, default=DEFAULT_VALKEY_PORT)
    valkey.add_argument("--data-dir", type=Path, default=DEFAULT_VALKEY_DATA_DIR)

    web = commands.add_parser(
        "web", help="run a web process (uvicorn) against REDIS_URL; the Procfile's `web`"
    )
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=8000)
    _add_task_options(web)
    worker = commands.add_parser(
        "worker", help="run an arq worker against REDIS_URL; the Procfile's `worker`"
    )
    _add_task_options(worker)

    submit = commands.add_parser("submit", parents=[connection], help="start a job")
    submit.add_argument("task", help="the task's name (see GET /api/tasks)")
    submit.add_argument(
        "--input",
        "-i",
        default="{}",
        metavar="JSON",
        help="the input: a JSON object, @file.json, or @- to read standard input",
    )
    submit.add_argument("--idempotency-key", metavar="KEY", help="submitting twice runs once")
    later = submit.add_mutually_exclusive_group()
    later.add_argument(
        "--delay", type=float, metavar="SECONDS", help="schedule it this many seconds from now"
    )
    later.add_argument(
        "--run-at", metavar="TIME", help="schedule it for an RFC 3339 time, e.g. 2030-01-01T09:00Z"
    )
    submit.add_argument("--watch", "-w", action="store_true", help="follow the job to its end")
    _add_output_options(submit)

    watch = commands.add_parser(
        "watch", parents=[connection], help="follow a job live until it ends"
    )
    watch.add_argument("job_id", metavar="ID")
    watch.add_argument(
        "--after",
        metavar="EVENT_ID",
        default="0",
        help="show only the events after this one (default: the whole log, then live)",
    )
    _add_output_options(watch)

    get = commands.add_parser("get", parents=[connection], help="print a job's record as JSON")
    get.add_argument("job_id", metavar="ID")

    jobs = commands.add_parser("jobs", parents=[connection], help="list jobs, newest first")
    jobs.add_argument("--status", help="only these states, comma separated (e.g. failed,cancelled)")
    jobs.add_argument("--task", help="only jobs of this task")
    jobs.add_argument(
        "--parent", metavar="ID", help="the children of this job, in the order it started them"
    )
    jobs.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    jobs.add_argument("--json", action="store_true", help="one JSON record per line")

    tasks = commands.add_parser(
        "tasks", parents=[connection], help="list the tasks the server runs"
    )
    tasks.add_argument(
        "--json", action="store_true", help="one JSON task per line, with its schema"
    )

    tail = commands.add_parser(
        "tail", parents=[connection], help="follow every job's events live (the firehose)"
    )
    tail.add_argument(
        "--after", metavar="EVENT_ID", help="start after this firehose id (0: all that is kept)"
    )
    tail.add_argument("--json", action="store_true", help="one JSON event per line")

    cancel = commands.add_parser("cancel", parents=[connection], help="cancel a job")
    cancel.add_argument("job_id", metavar="ID")

    answer = commands.add_parser(
        "answer", parents=[connection], help="give the input a waiting job asks for"
    )
    answer.add_argument("job_id", metavar="ID")
    answer.add_argument("name", help="the input's name (the job's waiting_for.name)")
    answer.add_argument(
        "--value",
        required=True,
        metavar="JSON",
        help="the value, fitting the input's schema: JSON, @file.json, or @- for standard input",
    )

    retry = commands.add_parser(
        "retry", parents=[connection], help="run a failed or cancelled job again"
    )
    retry.add_argument("job_id", metavar="ID")
    retry.add_argument("--watch", "-w", action="store_true", help="follow the job to its end")
    _add_output_options(retry)

    doctor = commands.add_parser("doctor", help="check the configuration, Redis and a web process")
    doctor.add_argument("--url", help="a web process to check, e.g. http://127.0.0.1:8000")

    keys = commands.add_parser("keys", help="create or revoke API keys (stored hashed in Redis)")
    key_actions = keys.add_subparsers(dest="action", required=True)
    create = key_actions.add_parser("create", help="create a key for OWNER and print it once")
    create.add_argument("owner")
    revoke = key_actions.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key")
    return parser


def _add_task_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--tasks",
        metavar="MODULES",
        help="your task modules, comma separated, e.g. `tasks` for ./tasks.py "
        "(default: $STEPSTREAM_TASK_MODULES)",
    )
    demo = command.add_mutually_exclusive_group()
    demo.add_argument(
        "--demo",
        dest="demo",
        action="store_true",
        default=None,
        help="load the two demo tasks beside your modules ($STEPSTREAM_DEMO_TASKS=true; "
        "without a module of yours they load anyway)",
    )
    demo.add_argument(
        "--no-demo",
        dest="demo",
        action="store_false",
        default=None,
        help="leave out the two demo tasks ($STEPSTREAM_DEMO_TASKS=false)",
    )


def _add_output_options(command: argparse.ArgumentParser) -> None:
    output = command.add_mutually_exclusive_group()
    output.add_argument(
        "--json", action="store_true", help="one JSON event per line (for pipes and jq)"
    )
    output.add_argument(
        "--plain", action="store_true", help="plain lines even on a terminal (no live bar)"
    )


# -- commands ------------------------------------------------------------------------------


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    job_input = read_input(args.input)
    job = client.submit(
        args.task,
        job_input,
        idempotency_key=args.idempotency_key,
        delay=args.delay,
        run_at=args.run_at,
    )
    if args.watch:
        # From the very beginning of the log: the `queued` event is the first line.
        return follow(client, job.id, "0", args)
    if args.json:
        print(job.model_dump_json(by_alias=True))
    else:
        print(job.id)
    return EXIT_COMPLETED


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    return follow(client, args.job_id, args.after, args)


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    job = client.get(args.job_id)
    # By alias: the fields read as the API writes them (`waiting_for.schema`, not `schema_`).
    print(json.dumps(job.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False))
    return EXIT_COMPLETED


def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    statuses = [s.strip() for s in args.status.split(",")] if args.status else None
    shown = 0
    page_size = min(max(args.limit, 1), 200)
    if not args.json:
        print(f"{'ID':<22}  {'TASK':<20}  {'STATE':<9}  {'DONE':>4}  {'CREATED':<19}  STEP")
    listed = client.iter_jobs(
        status=statuses, task=args.task, page_size=page_size, parent=args.parent
    )
    for job in listed:
        if shown >= args.limit:
            break
        shown += 1
        if args.json:
            print(job.model_dump_json(by_alias=True))
            continue
        step = str(job.step) if job.step and not job.finished else ""
        created = (job.created_at or "")[:19].replace("T", " ")
        print(
            f"{job.id:<22}  {job.task:<20}  {job.state.value:<9}  {job.progress:>4.0%}  "
            f"{created:<19}  {step}"
        )
    return EXIT_COMPLETED


def cmd_tasks(client: Client, args: argparse.Namespace) -> int:
    for task in client.tasks():
        if args.json:
            print(task.model_dump_json(by_alias=True))
            continue
        print(f"{task.name}  ({len(task.steps)} steps)  {task.title or ''}".rstrip())
        if task.description:
            print(f"    {task.description}")
    return EXIT_COMPLETED


def cmd_tail(client: Client, args: argparse.Namespace) -> int:
    renderer = make_renderer("json" if args.json else "plain", None)
    try:
        for event in client.events_all(after=args.after):
            renderer.show(event)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_COMPLETED


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    if job.cancel_requested:
        print(f"Cancel requested: job {job.id} stops at its next event")
    else:
        print(f"Cancelled job {job.id}")
    return EXIT_COMPLETED


def cmd_answer(client: Client, args: argparse.Namespace) -> int:
    job = client.answer(args.job_id, args.name, read_json(args.value, "--value"))
    print(f"Answered {args.name!r}: job {job.id} is {job.state.value}")
    return EXIT_COMPLETED


def cmd_retry(client: Client, args: argparse.Namespace) -> int:
    before = client.get(args.job_id)
    job = client.retry(args.job_id)
    if args.watch:
        # From the last event before the retry: the new `queued` event comes first.
        return follow(client, job.id, before.last_event_id or "0", args)
    print(f"Queued job {job.id} again (attempt {job.attempt + 1} of up to {job.max_attempts})")
    return EXIT_COMPLETED


def follow(client: Client, job_id: str, after: str | None, args: argparse.Namespace) -> int:
    """Show the job's events until it ends; the exit code says how it ended."""
    mode = "json" if args.json else "plain" if args.plain else "auto"
    renderer = make_renderer(mode, job_id)
    final: JobState | None = None
    try:
        for event in client.events(job_id, after=after):
            renderer.show(event)
            if isinstance(event, CompletedEvent):
                final = JobState.completed
            elif isinstance(event, FailedEvent):
                final = JobState.failed
            elif isinstance(event, CancelledEvent):
                final = JobState.cancelled
            elif isinstance(event, SnapshotEvent) and event.job.finished:
                final = event.job.state
    except KeyboardInterrupt:
        renderer.close()
        print(
            f"\nstepstream: stopped watching; job {job_id} keeps running on the server.\n"
            f"  follow it again: stepstream watch {job_id}\n"
            f"  stop it:         stepstream cancel {job_id}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        renderer.close()
    if final is None:
        # The stream ended with a 204: the cursor was the terminal event; ask how it ended.
        job = client.get(job_id)
        final = job.state
        if not args.json:
            print(describe_final(job))
    return STATE_EXIT_CODES.get(final, EXIT_FAILED)


def describe_final(job: Job) -> str:
    return describe(SnapshotEvent(id=job.last_event_id, job_id=job.id, job=job))


def read_input(raw: str) -> dict[str, Any]:
    value = read_json(raw, "--input")
    if not isinstance(value, dict):
        raise UsageError('--input must be a JSON object, e.g. \'{"text": "..."}\'')
    return value


def read_json(raw: str, option: str) -> Any:
    """An option's JSON: given as is, ``@file``, or ``@-`` for standard input."""
    if raw.startswith("@"):
        source = raw[1:]
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text()
        except OSError as exc:
            raise UsageError(f"{option}: cannot read {source}: {exc.strerror}") from None
    else:
        text = raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{option} is not valid JSON: {exc}") from None


class UsageError(Exception):
    pass


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": cmd_submit,
    "watch": cmd_watch,
    "get": cmd_get,
    "jobs": cmd_jobs,
    "tasks": cmd_tasks,
    "tail": cmd_tail,
    "cancel": cmd_cancel,
    "retry": cmd_retry,
    "answer": cmd_answer,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("up", "web", "worker"):
        # They check the project's task modules before starting its processes: imported from
        # the working directory, as `python -m` imports them in those processes.
        sys.path.insert(0, os.getcwd())
    if args.command == "up":
        return run_up(args.host, args.port, args.workers, args.data_dir, args.tasks, args.demo)
    if args.command == "valkey":
        return run_valkey(args.port, args.data_dir)
    if args.command == "web":
        run_web(args.host, args.port, args.tasks, args.demo)
    if args.command == "worker":
        run_worker(args.tasks, args.demo)
    # These two talk to Redis directly (they use the server's settings), so they are imported
    # only when asked for: the client itself stays free of the job side.
    if args.command == "doctor":
        from stepstream.doctor import main as doctor_main

        return doctor_main(["--url", args.url] if args.url else [])
    if args.command == "keys":
        from stepstream import apikey_command

        return apikey_command.run(args)
    # A terminal that cannot show "·" or "█" gets a replacement character, not a traceback.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        with Client(getattr(args, "url", None), api_key=getattr(args, "api_key", None)) as client:
            return COMMANDS[args.command](client, args)
    except UsageError as exc:
        print(f"stepstream: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ServerUnavailable as exc:
        print(f"stepstream: the server is unreachable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except APIError as exc:
        print(f"stepstream: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except StepstreamError as exc:
        print(f"stepstream: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("\nstepstream: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `stepstream tail | head`: the reader left; that is not an error.
        sys.stderr.close()
        return EXIT_COMPLETED


if __name__ == "__main__":
    raise SystemExit(main())
