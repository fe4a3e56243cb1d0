// The pure parts of static/stepstream.js: the SSE parser, the cursor rules, the back-off.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  Backoff,
  compareIds,
  Follower,
  parseRetryAfter,
  SseParser,
} from "../../static/stepstream.js";

const STREAM =
  "retry: 2000\n\n" +
  ": keep-alive\n\n" +
  'id: 1700000000000-0\nevent: snapshot\ndata: {"id":"J1","state":"running"}\n\n' +
  'id: 1700000000001-0\nevent: progress\ndata: {"current":1,"total":2}\n\n' +
  'event: token_expired\ndata: {"reason":"the stream token expired"}\n\n';

function parseAll(chunks) {
  const parser = new SseParser();
  return chunks.flatMap((chunk) => parser.push(chunk));
}

test("frames are the same however the bytes are split", () => {
  const whole = parseAll([STREAM]);
  assert.deepEqual(
    whole.map((f) => [f.event, f.id, f.retry]),
    [
      ["message", null, 2000],
      ["snapshot", "1700000000000-0", null],
      ["progress", "1700000000001-0", null],
      ["token_expired", null, null],
    ],
  );
  assert.deepEqual(JSON.parse(whole[2].data), { current: 1, total: 2 });
  for (let size = 1; size <= 7; size++) {
    const chunks = [];
    for (let i = 0; i < STREAM.length; i += size) chunks.push(STREAM.slice(i, i + size));
    assert.deepEqual(parseAll(chunks), whole, `chunks of ${size}`);
  }
});

test("CRLF and CR line ends, even split between chunks, and a BOM", () => {
  const crlf = STREAM.replaceAll("\n", "\r\n");
  const cr = STREAM.replaceAll("\n", "\r");
  const expected = parseAll([STREAM]);
  assert.deepEqual(parseAll(["\uFEFF" + crlf]), expected);
  assert.deepEqual(parseAll([cr]), expected);
  const at = crlf.indexOf("\r\n") + 1; // "\r" ends one chunk, "\n" starts the next
  assert.deepEqual(parseAll([crlf.slice(0, at), crlf.slice(at)]), expected);
});

test("multi-line data, a field without a colon, an incomplete frame held back", () => {
  const parser = new SseParser();
  assert.deepEqual(parser.push("event: log\ndata: a\ndata\ndata: b\n"), []);
  const [frame] = parser.push("\n");
  assert.equal(frame.data, "a\n\nb");
  assert.deepEqual(parser.push("id: 5-0\ndata: {}"), []); // no blank line yet
  assert.deepEqual(parser.push("\n\n")[0].id, "5-0");
  // An id alone is a frame: it moves the cursor. A comment alone is not.
  assert.deepEqual(parser.push("id: 6-0\n\n"), [{ event: "message", data: "", id: "6-0", retry: null }]);
  assert.deepEqual(parser.push(": ping\n\n"), []);
});

test("ids compare as numbers, digit by digit", () => {
  assert.equal(compareIds("9-0", "10-0"), -1);
  assert.equal(compareIds("10-2", "10-10"), -1);
  assert.equal(compareIds("0", "1-0"), -1);
  assert.equal(compareIds("99999999999999999999-1", "99999999999999999999-0"), 1);
  assert.equal(compareIds("007-1", "7-1"), 0);
  assert.equal(compareIds("x", "1-0"), null);
});

function frame(event, id, data = "{}") {
  return { event, id, data, retry: null };
}

test("a job's events once each, across an overlapping resume", () => {
  const follower = new Follower({ ends: true, after: "0" });
  const seen = [];
  const take = (f) => {
    const { event } = follower.accept(f);
    if (event) seen.push(event.id);
  };
  take(frame("queued", "1-0"));
  take(frame("started", "2-0"));
  // The next connection replays from an older point (a proxy, a second web process): the
  // repeated ids are dropped, the new one is delivered.
  follower.connectionOpened();
  take(frame("queued", "1-0"));
  take(frame("started", "2-0"));
  take(frame("step", "3-0"));
  assert.deepEqual(seen, ["1-0", "2-0", "3-0"]);
  assert.equal(follower.cursor, "3-0");
  assert.equal(follower.delivered, 1);
  assert.equal(follower.finished, false);
  take(frame("completed", "4-0"));
  assert.equal(follower.finished, true);
  assert.equal(follower.finalRecord, null); // the record is fetched
});

test("snapshot, reset, token_expired and retry: what each one does", () => {
  const follower = new Follower({ ends: true });
  assert.equal(follower.cursor, null);
  follower.accept({ event: "message", data: "", id: null, retry: 1500 });
  assert.equal(follower.retryMs, 1500);
  const reset = follower.accept(frame("reset", "9-9", '{"reason":"expired"}'));
  assert.deepEqual(reset.event, { id: null, type: "reset", data: { reason: "expired" } });
  assert.equal(follower.cursor, null, "a reset moves no cursor");
  const snapshot = follower.accept(frame("snapshot", "5-0", '{"id":"J","state":"running"}'));
  assert.equal(snapshot.event.type, "snapshot");
  assert.equal(follower.cursor, "5-0");
  assert.equal(follower.finished, false);
  const expired = follower.accept(frame("token_expired", null, '{"reason":"x"}'));
  assert.deepEqual(expired, { event: null, renew: true });
  assert.equal(follower.cursor, "5-0");

  // A finished job's snapshot ends the watch, and is the final record.
  const done = new Follower({ ends: true });
  done.accept(frame("snapshot", "7-0", '{"id":"J","state":"failed"}'));
  assert.equal(done.finished, true);
  assert.deepEqual(done.finalRecord, { id: "J", state: "failed" });
});

test("the firehose: an id alone moves the cursor; a reset starts again from 0", () => {
  const follower = new Follower({ ends: false });
  assert.equal(follower.accept(frame("message", "100-0", "")).event, null);
  assert.equal(follower.cursor, "100-0");
  follower.accept(frame("completed", "101-0"));
  assert.equal(follower.finished, false, "the firehose never ends");
  follower.accept(frame("reset", null, '{"reason":"trimmed"}'));
  assert.equal(follower.cursor, "0");
  assert.equal(follower.accept(frame("queued", "50-0")).event.id, "50-0");
});

test("back-off: at once after a healthy stream, doubling with jitter after failures", () => {
  const backoff = new Backoff({ random: () => 1 });
  // Before the first success: quick, from 250 ms.
  assert.equal(backoff.failed(), 250);
  assert.equal(backoff.failed(), 500);
  backoff.opened(10_000);
  assert.equal(backoff.dropped({ delivered: 3, retryMs: 2000, now: 10_100 }), 0);
  assert.equal(backoff.dropped({ delivered: 0, retryMs: 2000, now: 20_000 }), 0, "lasted 10 s");
  // Refused from now on: the server's retry, doubling, capped at 10 s.
  const delays = [1, 2, 3, 4, 5].map(() => backoff.failed({ retryMs: 2000 }));
  assert.deepEqual(delays, [2000, 4000, 8000, 10_000, 10_000]);
  // Opened and closed at once with nothing: a failure, not a reconnect at once.
  backoff.opened(50_000);
  assert.equal(backoff.dropped({ delivered: 0, retryMs: 2000, now: 50_010 }), 10_000);
  // Jitter takes up to a fifth off; Retry-After is a floor.
  const jittery = new Backoff({ random: () => 0 });
  assert.equal(jittery.failed(), 200);
  assert.equal(jittery.failed({ retryAfterMs: 5000 }), 5000);
});

test("Retry-After in seconds or as a date", () => {
  assert.equal(parseRetryAfter("5"), 5000);
  assert.equal(parseRetryAfter(null), null);
  assert.equal(parseRetryAfter("soon"), null);
  const now = Date.parse("2025-01-01T00:00:00Z");
  assert.equal(parseRetryAfter("Wed, 01 Jan 2025 00:00:03 GMT", now), 3000);
  assert.equal(parseRetryAfter("Tue, 31 Dec 2024 00:00:00 GMT", now), 0);
});
