"""A request's head (its line and headers) is bounded in size by ``stepstream web`` itself:
431 past STEPSTREAM_MAX_HEADER_BYTES, before the rest is read (server/protocol.py)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from tests.conftest import StackFactory
from tests.support import http
from tests.support.api import DOC, submit

MIB = 1 << 20


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _send_head(port: int, size: int, chunk: int = 256 * 1024) -> tuple[int, bytes]:
    """Send a GET /healthz whose one header is ``size`` bytes long, in chunks; stop when the
    server closes. Returns the bytes sent and what the server answered."""
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            block = b"a" * chunk
            while sent < size:
                conn.sendall(block)
                sent += len(block)
            conn.sendall(b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the server: what it said is still to be read
        try:
            while data := conn.recv(65536):
                answer += data
        except (ConnectionResetError, TimeoutError):
            pass
    return sent, answer


def _rss_peak_kib(pid: int) -> int:
    """The process's peak resident set (VmHWM), which no later release of memory lowers."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_2_mb_head_gets_431_and_the_server_goes_on(make_stack: StackFactory) -> None:
    s = make_stack(workers=0)
    _, answer = _send_head(_port(s.url), 2 * MIB)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), answer[:200]
    error = json.loads(body)["error"]
    assert error["code"] == "header_too_large"
    assert error["details"] == {"limit": 65536, "setting": "STEPSTREAM_MAX_HEADER_BYTES"}
    # A head within the limit is served as before, and the count starts again with each
    # request of a kept-alive connection: three 40 KB heads on one connection all pass.
    port = _port(s.url)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        for _ in range(3):
            conn.sendall(head)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = conn.recv(65536)
                assert data, f"closed after {answer!r}"
                answer += data
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_a_100_mb_head_is_cut_off_early_and_leaves_memory_bounded(
    make_stack: StackFactory,
) -> None:
    s = make_stack(workers=0)
    pid = s.webs[0].proc.pid  # type: ignore[union-attr]
    assert http.get(f"{s.url}/healthz", timeout=10).status_code == 200
    before = _rss_peak_kib(pid)
    started = time.monotonic()
    sent, answer = _send_head(_port(s.url), 100 * MIB, chunk=MIB)
    assert time.monotonic() - started < 30
    # The kernel's socket buffers take a few MB before the close is seen; never the 100 MB.
    assert sent < 32 * MIB, f"{sent} bytes were taken before the connection closed"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert http.get(f"{s.url}/healthz", timeout=10).status_code == 200
    grown = _rss_peak_kib(pid) - before
    assert grown < 20 * 1024, f"the web process's peak RSS grew by {grown} KiB"


def test_responses_on_one_connection_arrive_whole_and_in_order(make_stack: StackFactory) -> None:
    """A response with a Content-Length goes out as one write, its head held until its body
    (server/protocol.py, HeadHolding); a HEAD answer has no body, and its head still goes out.
    Pipelined on one kept-alive connection: a GET, a HEAD, a 404 and a GET that closes."""
    s = make_stack(workers=0)
    requests = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /no-such-page HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answer = b""
    with socket.create_connection(("127.0.0.1", _port(s.url)), timeout=10) as conn:
        conn.sendall(requests)
        while data := conn.recv(65536):
            answer += data
    statuses = []
    rest = answer
    for method in ("GET", "HEAD", "GET", "GET"):
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        statuses.append(int(lines[0].split()[1]))
        fields = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(fields["content-length"])
        assert length > 0
        if method == "GET":
            body, rest = rest[:length], rest[length:]
            assert json.loads(body), body  # whole: the JSON parses
    assert statuses == [200, 200, 404, 200]
    assert rest == b""


def test_a_stream_whose_first_frames_wait_is_seen_open_before_them(
    make_stack: StackFactory,
) -> None:
    """An event stream's head waits a moment for its first frames, to go out with them in one
    write (server/protocol.py, HeadHolding); a stream whose first frames are slow (here Redis
    confirms each subscription 3 s late) sends its head alone first: the client sees it open."""
    s = make_stack(workers=0, STEPSTREAM_SUBSCRIBE_DELAY_SECONDS="3")
    job = submit(s.url, "analyze_document", {"text": DOC})
    request = f"GET /api/jobs/{job['id']}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", _port(s.url)), timeout=20) as conn:
        conn.sendall(request)
        first = b""
        while b"\r\n\r\n" not in first:
            data = conn.recv(65536)
            assert data, f"closed before the head: {first!r}"
            first += data
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        assert b"text/event-stream" in first
        assert b"retry:" not in first, "the head waited for the stream's first frames"
        body = first.partition(b"\r\n\r\n")[2]
        while b"event: snapshot" not in body:
            data = conn.recv(65536)
            assert data, f"closed before the snapshot: {body!r}"
            body += data
    assert b"retry: " in body


def test_a_stream_s_head_answer_comes_before_the_next_answer_on_its_connection(
    make_stack: StackFactory,
) -> None:
    """A HEAD of an event stream has no frames for its head to wait for: the head goes out when
    the answer ends, before the next pipelined request's answer on the same connection."""
    s = make_stack(workers=0)
    job = submit(s.url, "analyze_document", {"text": DOC})
    requests = (
        f"HEAD /api/jobs/{job['id']}/events HTTP/1.1\r\nHost: x\r\n\r\n"
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = b""
    with socket.create_connection(("127.0.0.1", _port(s.url)), timeout=10) as conn:
        conn.sendall(requests)
        while data := conn.recv(65536):
            answer += data
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"content-type: text/event-stream" in first, "the answers came out of order"
    second, _, body = rest.partition(b"\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 200"), rest[:300]
    assert b"content-type: application/json" in second
    assert json.loads(body)
