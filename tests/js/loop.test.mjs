// WatchLoop: the browser client's connection loop as a state machine, driven by hand. Each test
// feeds it what a connection did and reads the actions it asks for (no sockets, no timers).
import assert from "node:assert/strict";
import { test } from "node:test";

import { Backoff, StepstreamError, UNREACHABLE_AFTER, WatchLoop } from "../../static/stepstream.js";

const frame = (event, id, data = {}) => ({ event, id, data: JSON.stringify(data), retry: null });

/** A loop for one job's stream; jitter pinned to its top (a factor of exactly 1). */
const jobLoop = (options = {}) =>
  new WatchLoop({ ends: true, backoff: new Backoff({ random: () => 1 }), ...options });

const types = (actions) => actions.map((a) => a.type);
const next = (actions) => actions.at(-1);

/** Start, open and read `frames`; returns the actions of the last frame. */
function openWith(loop, frames, now = 1000) {
  loop.start();
  loop.opened(now);
  let actions = [];
  for (const f of frames) actions = loop.frame(f);
  return actions;
}

test("after a dropped stream or a failed connect it reconnects with the last event's id", () => {
  const loop = jobLoop({ after: "0" });
  assert.deepEqual(loop.start(), [
    { type: "state", state: "connecting" },
    { type: "connect", params: { after: "0", token: null } },
  ]);
  assert.deepEqual(loop.opened(1000), [{ type: "state", state: "live" }]);
  const delivered = loop.frame(frame("queued", "1-0"));
  const queued = { id: "1-0", type: "queued", data: {} };
  assert.deepEqual(delivered, [{ type: "deliver", event: queued }]);
  loop.frame(frame("started", "2-0"));
  // A stream that delivered something is resumed at once, from its last id.
  assert.deepEqual(loop.ended(1100), [
    { type: "state", state: "reconnecting" },
    { type: "arm-offline" },
    { type: "connect", params: { after: "2-0", token: null } },
  ]);
  // That connect gets no answer: a wait, then the same cursor again.
  assert.equal(next(loop.unanswered(new TypeError("Failed to fetch"))).type, "wait");
  assert.equal(loop.state, "backing-off");
  assert.deepEqual(loop.retry(), [{ type: "connect", params: { after: "2-0", token: null } }]);
  // A 503 likewise.
  assert.equal(next(loop.refused({ status: 503 })).type, "wait");
  assert.deepEqual(loop.retry(), [{ type: "connect", params: { after: "2-0", token: null } }]);
});

test("failed connects back off: 250 ms doubling to 10 s, and never sooner than Retry-After", () => {
  const loop = jobLoop();
  loop.start();
  const waits = [];
  for (let n = 0; n < 8; n += 1) {
    const action = next(loop.unanswered(new TypeError("Failed to fetch")));
    assert.equal(action.type, "wait");
    waits.push(action.ms);
    assert.equal(loop.retry()[0].type, "connect");
  }
  assert.deepEqual(waits, [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);

  const busy = jobLoop();
  busy.start();
  assert.deepEqual(next(busy.refused({ status: 429, retryAfterMs: 3000 })), { type: "wait", ms: 3000 });
});

test(`${UNREACHABLE_AFTER} connects in a row with no answer: one non-fatal report, and it goes on`, () => {
  const loop = jobLoop();
  loop.start();
  const reports = [];
  for (let n = 1; n <= UNREACHABLE_AFTER + 2; n += 1) {
    const actions = loop.unanswered(new TypeError(`try ${n}`));
    assert.ok(!types(actions).includes("fail"), `try ${n}: ${JSON.stringify(actions)}`);
    assert.equal(next(actions).type, "wait", "it keeps trying");
    for (const a of actions) if (a.type === "unreachable") reports.push([n, a.cause.message]);
    loop.retry();
  }
  assert.deepEqual(reports, [[UNREACHABLE_AFTER, `try ${UNREACHABLE_AFTER}`]]);
  assert.equal(loop.over, false);
  // An answer, even a 503, ends the run of failures: three more make a second report.
  loop.refused({ status: 503 });
  loop.retry();
  const again = [];
  for (let n = 1; n <= UNREACHABLE_AFTER; n += 1) {
    if (types(loop.unanswered(new TypeError("again"))).includes("unreachable")) again.push(n);
    loop.retry();
  }
  assert.deepEqual(again, [UNREACHABLE_AFTER]);
});

test("a terminal event ends the stream: the final record is fetched, no reconnect follows", () => {
  const loop = jobLoop({ tokens: true });
  assert.deepEqual(types(loop.start()), ["state", "token"]);
  assert.deepEqual(loop.tokenArrived("t1"), [{ type: "connect", params: { after: null, token: "t1" } }]);
  const last = openWith(loop, [frame("progress", "4-0"), frame("completed", "5-0")]);
  assert.deepEqual(types(last), ["deliver"]);
  assert.equal(loop.state, "finishing", "the loop is done with this stream");
  assert.deepEqual(loop.ended(2000), [{ type: "fetch-record", params: { token: "t1" } }]);
  const record = { id: "J1", state: "completed" };
  assert.deepEqual(loop.record(record), [
    { type: "state", state: "closed" },
    { type: "end", record },
  ]);
  assert.equal(loop.state, "done");
  const after = [loop.ended(3000), loop.retry(), loop.unanswered(new Error("x")), loop.start()];
  assert.deepEqual(after, [[], [], [], []]);
});

test("a terminal snapshot is the final record, and a 204 fetches it", () => {
  const snapshot = { id: "J1", state: "failed" };
  const loop = jobLoop();
  openWith(loop, [frame("snapshot", "5-0", snapshot)]);
  assert.deepEqual(loop.ended(2000), [
    { type: "state", state: "closed" },
    { type: "end", record: snapshot },
  ]);

  const over = jobLoop({ after: "5-0" });
  over.start();
  assert.deepEqual(over.terminal(), [{ type: "fetch-record", params: { token: null } }]);
});

test("the firehose goes on after a terminal event", () => {
  const loop = new WatchLoop({ ends: false });
  openWith(loop, [frame("completed", "5-0")]);
  assert.equal(loop.state, "open");
});

test("close() while backing off cancels the wait; while open, aborts the connection", () => {
  const waiting = jobLoop();
  waiting.start();
  waiting.unanswered(new TypeError("Failed to fetch"));
  assert.equal(waiting.state, "backing-off");
  assert.deepEqual(waiting.close(), [{ type: "disarm-offline" }, { type: "cancel-wait" }]);
  assert.equal(waiting.state, "closed");
  assert.deepEqual(waiting.retry(), [], "the wait's end starts nothing");
  assert.deepEqual(waiting.close(), []);

  const open = jobLoop();
  openWith(open, [frame("queued", "1-0")]);
  assert.deepEqual(open.close(), [{ type: "abort" }]);
  assert.deepEqual(open.frame(frame("started", "2-0")), [], "no event after close()");
  assert.deepEqual(open.ended(2000), []);
});

test("an HTTP 4xx is fatal: closed, one failure, nothing after", () => {
  for (const status of [400, 403, 404]) {
    const loop = jobLoop();
    loop.start();
    const error = new StepstreamError("scripted", { status, code: `http_${status}` });
    assert.deepEqual(loop.refused({ status, error }), [
      { type: "state", state: "closed" },
      { type: "fail", error },
    ]);
    assert.equal(loop.state, "closed");
    assert.deepEqual(loop.retry(), []);
    assert.deepEqual(loop.unanswered(new Error("late")), []);
  }
});

test("a 401 renews a kept token at once; a fresh token refused is fatal", () => {
  const loop = jobLoop({ tokens: true });
  loop.start();
  loop.tokenArrived("t1");
  openWith(loop, []);
  loop.ended(10_000); // a long-lived stream dropped: resumed at once, with the kept token
  const unauthorized = new StepstreamError("no", { status: 401, code: "unauthorized" });
  assert.deepEqual(loop.refused({ status: 401, error: unauthorized }), [
    { type: "token", reason: "unauthorized" },
  ]);
  loop.tokenArrived("t2");
  const refused = loop.refused({ status: 401, error: unauthorized });
  assert.deepEqual(refused.slice(-2), [
    { type: "state", state: "closed" },
    { type: "fail", error: unauthorized },
  ]);
  assert.equal(loop.state, "closed");
});
