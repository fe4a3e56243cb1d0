// A parent job's record folded from its stream: the wait for its children, their `child`
// events rolling the parent's progress up, and the resume that follows.
import assert from "node:assert/strict";
import { test } from "node:test";

import { RecordFold } from "../../static/stepstream.js";

const JOB = "P1";
const ref = (index) => ({ index, count: 2, name: ["Fan out", "Merge"][index - 1] });
let n = 0;
const event = (type, data = {}) => {
  n += 1;
  return { id: `${n}-0`, type, data: { job_id: JOB, type, at: "2026-01-01T00:00:00.000000Z", attempt: 1, ...data } };
};
const counts = (done, failed = 0) => ({ size: 4, done, completed: done - failed, failed, cancelled: 0 });

test("a parent's children roll its progress up while it waits, and never back", () => {
  const fold = new RecordFold(JOB);
  fold.apply(event("queued", { attempt: 0, input: {} }));
  fold.apply(event("started", { max_attempts: 1 }));
  fold.apply(event("step", { step: ref(1) }));
  let record = fold.apply(event("waiting", { children: counts(0) }));
  assert.equal(record.state, "waiting");
  assert.deepEqual(record.waiting_for, { children: counts(0) });
  assert.equal(record.message, "Waiting for 4 child jobs");
  assert.equal(record.attempt, 0);

  record = fold.apply(event("child", { attempt: 0, child: { id: "c0", index: 0, state: "running" } }));
  assert.equal(record.progress, 0);

  const end = (done, progress, message) =>
    event("child", { attempt: 0, child: { id: `c${done}`, state: "completed" }, counts: counts(done), progress, message });
  record = fold.apply(end(1, 0.125, "1 of 4 done"));
  record = fold.apply(end(3, 0.375, "3 of 4 done"));
  assert.equal(record.progress, 0.375);
  assert.equal(record.message, "3 of 4 done");
  assert.equal(record.children.done, 3);
  record = fold.apply(end(2, 0.25, "2 of 4 done")); // shown late: counts only go up
  assert.equal(record.children.done, 3);
  assert.equal(record.progress, 0.375);

  record = fold.apply(end(4, 0.5, "4 of 4 done"));
  record = fold.apply(event("started", { max_attempts: 1 }));
  assert.equal(record.state, "running");
  assert.equal(record.waiting_for, null);
  record = fold.apply(event("step_completed", { step: ref(1), duration_ms: 5 }));
  assert.equal(record.progress, 0.5);
  assert.equal(record.children.completed, 4);
});
