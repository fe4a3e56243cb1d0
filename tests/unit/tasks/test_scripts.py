"""tasks/scripts/*.lua: every key a script touches comes from KEYS (a static check; the run-time
one, with an ACL user allowed only the declared keys, is in tests/test_store.py)."""

from __future__ import annotations

import re

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from stepstream.tasks import lua
from stepstream.tasks.commands import Command
from stepstream.tasks.connection import arq_pool
from stepstream.tasks.queue import enqueue_commands
from stepstream.tasks.settings import Settings
from stepstream.tasks.store import JobStore

SCRIPTS = {"append": lua.append(), "resume": lua.resume()}
KEYLESS = frozenset({"TIME"})  # commands that take no key
# redis.call('NAME', first argument ...
LITERAL_CALL = re.compile(r"redis\.p?call\(\s*'([A-Z]+)'\s*(?:,\s*([^,)]+))?")
ANY_CALL = re.compile(r"redis\.p?call\(")
KEY = re.compile(r"KEYS\[[^\]]+\]")


def code(text: str) -> str:
    """The script without its comments (no string in them holds ``--``)."""
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


def assignments(text: str) -> dict[str, list[str]]:
    """Every value each name is given: ``a, b = x, y`` and ``local a, b = x, y``."""
    given: dict[str, list[str]] = {}
    for names, values in re.findall(
        r"^\s*(?:local\s+)?([A-Za-z_][\w, ]*?)\s*=\s*(?!=)(.+)$", text, re.M
    ):
        parts = [v.strip() for v in values.split(",")]
        for index, name in enumerate(n.strip() for n in names.split(",")):
            given.setdefault(name, []).append(parts[index] if index < len(parts) else "")
    return given


def key_names(text: str) -> set[str]:
    """Names that only ever hold a ``KEYS[...]``, and the parameters of local functions that
    every call passes one of those (or a ``KEYS[...]``) in."""
    names = {
        name
        for name, values in assignments(text).items()
        if values and all(KEY.fullmatch(v) for v in values)
    }
    for function, params in re.findall(r"local function (\w+)\(([^)]*)\)", text):
        params_list = [p.strip() for p in params.split(",")]
        calls = [
            [a.strip() for a in args.split(",")]
            for args in re.findall(rf"(?<!function ){function}\(([^)]*)\)", text)
        ]
        for index, param in enumerate(params_list):
            given = [args[index] for args in calls if index < len(args)]
            if calls and all(a in names or KEY.fullmatch(a) for a in given):
                names.add(param)
    return names


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_of_a_script_takes_its_key_from_keys(name: str) -> None:
    text = code(SCRIPTS[name])
    keys = key_names(text)
    literal = LITERAL_CALL.findall(text)
    assert literal, "no command found: the check checked nothing"
    for command, first in literal:
        if command in KEYLESS:
            continue
        first = first.strip()
        assert first in keys or KEY.fullmatch(first), (
            f"{name}.lua: {command} on {first!r}, not a key from KEYS"
        )
    # The one command not named in the text: the ride-along commands, whose keys come from
    # KEYS and whose other arguments come after them, from ARGV.
    dynamic = len(ANY_CALL.findall(text)) - len(literal)
    if name == "append":
        assert dynamic == 1 and "redis.call(unpack(call))" in text
        pieces = re.findall(r"call\[#call \+ 1\] = (\S+)", text)
        assert pieces == ["KEYS[key]", "ARGV[arg]"], pieces
    else:
        assert dynamic == 0


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_no_key_name_is_built_in_a_script(name: str) -> None:
    text = code(SCRIPTS[name])
    # The key prefixes (Keys' and arq's) never appear: a name built here would need one.
    assert "stepstream:" not in text and "arq:" not in text
    for assigned, values in assignments(text).items():
        for value in values:
            assert not (".." in value and ("KEYS" in value or "ARGV" in value)), (
                f"{name}.lua: {assigned} is built: {value}"
            )


def test_one_jobs_own_keys_share_its_hash_slot() -> None:
    # What a cluster needs of every key of one call. True today of the job's own keys and of
    # its batch's; the global ones (firehose, index, owner's set, outbox, counters) are the
    # cluster step's: declared in KEYS, they are where it must partition.
    store = JobStore(Redis(), Settings())
    call = store.script_call(
        "j1",
        [{"type": "completed"}],
        {"state": "completed"},
        None,
        "update",
        (),
        [Command("DEL", [store.keys.job_text("j1")])],
        batch="p1",
    )
    keys, _ = store.lay_out(call)
    own = [store.keys.job("j1"), store.keys.job_events("j1"), store.keys.job_cancel("j1")]
    own += [store.keys.job_channel("j1"), store.keys.job_text("j1")]
    assert set(own) <= set(keys)
    assert {key_slot(k.encode()) for k in own} == {key_slot(b"{j1}")}
    batch = [store.keys.batch_counts("p1"), store.keys.batch_ended("p1")]
    assert set(batch) <= set(keys)
    assert {key_slot(k.encode()) for k in batch} == {key_slot(b"{p1}")}


def test_on_a_cluster_every_key_of_a_call_shares_its_partitions_slot() -> None:
    # The end of a batch's child, with an arq enqueue riding along: on a cluster, the queue
    # plane's commands (and any key of another slot) leave the script for its queue outbox.
    store = JobStore(Redis(), Settings(cluster_url="redis://127.0.0.1:7000"))
    parent = store.new_job_id()
    child = store.new_job_id(parent=parent)
    call = store.script_call(
        child,
        [{"type": "completed"}],
        {"state": "completed"},
        "owner",
        "update",
        (),
        [
            Command("DEL", [store.keys.job_text(child)]),
            *enqueue_commands(arq_pool(Settings()), store.keys, child),
        ],
        batch=parent,
    )
    inside, entry = store._outboxed(call)
    keys, _ = store.lay_out(inside)
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert store.keys.of(child).queue_outbox in keys
    assert entry is not None
    assert {"PSETEX", "ZADD", "PUBLISH"} <= {c.name for c in entry[1]}
    assert not any(k.startswith("arq:") or k == store.keys.queue for k in keys)
