// The record a page shows (`onRecord`): the snapshot, or the log from its start, folded event by
// event with the dashboard's own fold; and the non-fatal `onError` of a watch that gets no
// answer (a network error, or a page on an origin the server does not allow).
import assert from "node:assert/strict";
import http from "node:http";
import { test } from "node:test";

import { RecordFold, UNREACHABLE_AFTER, UNREACHABLE_HINT, watchJob } from "../../static/stepstream.js";

const JOB = "J1";
const STEPS = ["Check stock", "Pack", "Label"];
const ref = (index) => ({ index, count: STEPS.length, name: STEPS[index - 1] });
const at = (n) => `2026-01-01T00:00:0${n}.000000Z`;
const event = (id, type, data = {}) => ({
  id,
  type,
  data: { job_id: JOB, type, at: at(Number(id.split("-")[0]) % 10), attempt: 1, ...data },
});

// The job's whole log, as `after: "0"` replays it.
const LOG = [
  event("1-0", "queued", { attempt: 0, input: { item: "teapot" } }),
  event("2-0", "started", { max_attempts: 1 }),
  event("3-0", "step", { step: ref(1) }),
  event("4-0", "progress", { current: 1, total: 2, message: "teapot: in stock" }),
  event("5-0", "step_completed", { step: ref(1), duration_ms: 5, output: "shelf B4" }),
  event("6-0", "step", { step: ref(2) }),
  event("7-0", "output", { step: ref(2), text: "Wrapping ", offset: 0 }),
  event("8-0", "output", { step: ref(2), text: "🫖 done", offset: 9 }),
  event("9-0", "step_completed", { step: ref(2), duration_ms: 5 }),
  event("10-0", "step", { step: ref(3) }),
  event("11-0", "step_completed", { step: ref(3), duration_ms: 5, output: "1 x teapot" }),
  event("12-0", "completed", { result: { line: "1 x teapot" } }),
];

const RECORD = {
  id: JOB,
  task: "pack_order",
  state: "completed",
  input: { item: "teapot" },
  step: ref(3),
  progress: 1,
  message: null,
  steps: STEPS.map((name, i) => ({ index: i + 1, name, state: "completed", text: i === 1 ? "Wrapping 🫖 done" : null })),
  attempt: 1,
  max_attempts: 1,
  result: { line: "1 x teapot" },
  last_event_id: "12-0",
};

test("the log from its start folds into the record: state, step, progress, streamed text", () => {
  const fold = new RecordFold(JOB);
  const seen = LOG.map((e) => structuredClone(fold.apply(e)));
  assert.equal(seen[0].state, "queued");
  assert.deepEqual(seen[0].input, { item: "teapot" });
  assert.equal(seen[1].state, "running");
  assert.deepEqual(seen[2].step, ref(1));
  assert.equal(seen[3].message, "teapot: in stock");
  assert.equal(seen[3].progress, 0.5 / 3);
  assert.equal(seen[7].steps[1].text, "Wrapping 🫖 done", "deltas at their offsets, in code points");
  const last = seen.at(-1);
  assert.equal(last.state, "completed");
  assert.deepEqual(last.step, ref(3));
  assert.equal(last.progress, 1);
  assert.deepEqual(last.result, { line: "1 x teapot" });
  assert.equal(last.last_event_id, "12-0");
  assert.deepEqual(last.steps.map((s) => [s.name, s.state]), STEPS.map((name) => [name, "completed"]));
});

test("a snapshot is the record; the events after it fold into it; a reset waits for its snapshot", () => {
  const fold = new RecordFold(JOB);
  const running = { ...RECORD, state: "running", step: ref(2), progress: 1 / 3, result: null, last_event_id: "8-0" };
  const fromSnapshot = fold.apply({ id: "8-0", type: "snapshot", data: running });
  assert.deepEqual(fromSnapshot, running);
  assert.notEqual(fromSnapshot, running, "the fold keeps a copy of its own");
  assert.equal(fold.apply({ id: null, type: "reset", data: { reason: "expired" } }), null);
  for (const e of LOG.slice(8)) fold.apply(e);
  assert.equal(fold.record.state, "completed");
  assert.equal(fold.record.task, "pack_order", "what the snapshot had is kept");
  assert.equal(fold.record.steps[1].text, "Wrapping 🫖 done");
  assert.equal(running.state, "running", "the snapshot's data is not changed");
});

test("a batch's counts, and an event with no record to fold into", () => {
  const fold = new RecordFold(JOB);
  assert.equal(fold.apply(event("3-0", "step", { step: ref(1) })), null, "no snapshot, not the start");
  fold.apply({ id: "5-0", type: "snapshot", data: { id: JOB, state: "running", step: { index: 1, count: 1, name: "items" }, steps: [], batch: { size: 4, done: 1 } } });
  const record = fold.apply(event("6-0", "progress", { current: 3, total: 4, counts: { size: 4, done: 3, completed: 2, failed: 1 } }));
  assert.deepEqual(record.batch, { size: 4, done: 3, completed: 2, failed: 1 });
  // Two items ending together may report out of order: the count only goes up.
  fold.apply(event("7-0", "progress", { current: 2, total: 4, counts: { size: 4, done: 2, completed: 2 } }));
  assert.equal(fold.record.batch.done, 3);
});

/** A server answering request n with script[n] (`null`: the connection is cut, no answer). */
async function scripted(script) {
  const requests = [];
  const server = http.createServer((req, res) => {
    requests.push(new URL(req.url, "http://localhost").pathname);
    const answer = script[requests.length - 1];
    if (answer === null || answer === undefined) req.socket.destroy();
    else answer(res);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    base: `http://127.0.0.1:${server.address().port}/`,
    requests,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

const stream = (events) => (res) => {
  res.writeHead(200, { "content-type": "text/event-stream" });
  res.write("retry: 20\n\n");
  for (const e of events) res.write(`${e.id ? `id: ${e.id}\n` : ""}event: ${e.type}\ndata: ${JSON.stringify(e.data)}\n\n`);
  res.end();
};
const json = (body) => (res) => {
  res.writeHead(200, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
};

/** Watch until onEnd (or a fatal onError); everything reported, with the requests made by then. */
function run(server, options = {}) {
  const seen = { records: [], ends: [], errors: [], states: [] };
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no end: ${JSON.stringify(seen)}`)), 15_000);
    const done = () => {
      clearTimeout(timer);
      setTimeout(() => resolve(seen), 100); // a late callback would show up here
    };
    watchJob(JOB, {
      baseUrl: server.base,
      ...options,
      onRecord: (record) => seen.records.push(record),
      onState: (state) => seen.states.push(state),
      onEnd: (record) => {
        seen.ends.push(record);
        done();
      },
      onError: (error) => {
        seen.errors.push({ error, requests: server.requests.length, states: [...seen.states] });
        if (error.fatal) done();
      },
    });
  });
}

test("onRecord for a finished job: its snapshot, once, then onEnd with it", async () => {
  const server = await scripted([stream([{ id: "12-0", type: "snapshot", data: RECORD }])]);
  try {
    const seen = await run(server);
    assert.deepEqual(seen.records, [RECORD]);
    assert.deepEqual(seen.ends, [RECORD]);
    assert.deepEqual(seen.errors, []);
  } finally {
    await server.close();
  }
});

test("onRecord for a running job: after the snapshot, after every event, then the final record", async () => {
  const running = { ...RECORD, state: "running", step: ref(2), progress: 1 / 3, result: null, last_event_id: "8-0" };
  const final = { ...RECORD, finished_at: at(9) };
  const server = await scripted([
    stream([{ id: "8-0", type: "snapshot", data: running }, ...LOG.slice(8)]),
    json(final),
  ]);
  try {
    const seen = await run(server);
    assert.equal(seen.records.length, 1 + LOG.slice(8).length + 1);
    assert.deepEqual(seen.records[0], running);
    assert.deepEqual(seen.records.slice(1, -1).map((r) => [r.last_event_id, r.state, r.step.index]), [
      ["9-0", "running", 2],
      ["10-0", "running", 3],
      ["11-0", "running", 3],
      ["12-0", "completed", 3],
    ]);
    assert.deepEqual(seen.records.at(-1), final, "the last one is the record onEnd gets");
    assert.equal(new Set(seen.records).size, seen.records.length, "a new object each call");
    assert.deepEqual(seen.ends, [final]);
  } finally {
    await server.close();
  }
});

test("onRecord from the start of the log (after: '0') for a job that has not started yet", async () => {
  const server = await scripted([(res) => stream(LOG.slice(0, 1))(res)]);
  const records = [];
  const stop = watchJob(JOB, { baseUrl: server.base, after: "0", onRecord: (r) => records.push(r) });
  try {
    const deadline = Date.now() + 5000;
    while (!records.length && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.equal(records[0]?.state, "queued");
    assert.deepEqual(records[0].input, { item: "teapot" });
  } finally {
    stop();
    await server.close();
  }
});

test(`no answer ${UNREACHABLE_AFTER} times in a row: a non-fatal onError with the hint; the watch goes on`, async () => {
  // Cut connections stand for what a page sees when the browser blocks a stream for CORS: fetch
  // rejects, with no status and no reason.
  const server = await scripted([
    null,
    null,
    null,
    null,
    stream([LOG[0]]), // an answer: the count starts over
    null,
    null,
    stream([{ id: "12-0", type: "snapshot", data: RECORD }]),
  ]);
  try {
    const seen = await run(server, { after: "0" });
    assert.equal(seen.errors.length, 1, "once per run of failures, not per failure");
    const [{ error, requests, states }] = seen.errors;
    assert.equal(error.fatal, false);
    assert.equal(error.code, "unreachable");
    assert.equal(error.status, 0);
    assert.ok(error.message.startsWith(UNREACHABLE_HINT), error.message);
    assert.match(error.message, /STEPSTREAM_CORS_ORIGINS/);
    assert.equal(requests, UNREACHABLE_AFTER, "said after the third failure");
    assert.ok(!states.includes("closed"), states);
    // And the watch went on: it connected, and ended with the record.
    assert.deepEqual(seen.ends, [RECORD]);
    assert.equal(server.requests.length, 8);
    assert.equal(seen.records.at(-1).state, "completed");
  } finally {
    await server.close();
  }
});

test("a fatal error says so: fatal is true, and the watch is over", async () => {
  const server = await scripted([
    (res) => {
      res.writeHead(404, { "content-type": "application/json" });
      res.end('{"error":{"code":"job_not_found","message":"no such job","details":null}}');
    },
  ]);
  try {
    const seen = await run(server);
    assert.equal(seen.errors.length, 1);
    assert.equal(seen.errors[0].error.fatal, true);
    assert.equal(seen.errors[0].error.code, "job_not_found");
    assert.equal(seen.states.at(-1), "closed");
  } finally {
    await server.close();
  }
});
