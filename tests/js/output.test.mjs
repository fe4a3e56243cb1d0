// A step's streamed text in the browser client: `output` deltas continued at their offsets,
// counted in characters as the server counts them, a restart (offset 0, new attempt) clearing
// the old text, and watchJob's onText/text() over a real HTTP server.
import assert from "node:assert/strict";
import http from "node:http";
import { test } from "node:test";

import { StepTexts, applyOutput, watchJob } from "../../static/stepstream.js";

const WRITE = { index: 2, count: 3, name: "write" };
const output = (text, offset, attempt = 1, step = WRITE) => ({
  type: "output",
  data: { type: "output", step, text, offset, attempt },
});

test("deltas continue the text at their offsets; offset 0 starts it over", () => {
  assert.equal(applyOutput(null, { text: "Hel", offset: 0 }), "Hel");
  assert.equal(applyOutput("Hel", { text: "lo", offset: 3 }), "Hello");
  assert.equal(applyOutput("Hello", { text: "New", offset: 0 }), "New");
  // An overlap (the same delta again) replaces rather than repeats.
  assert.equal(applyOutput("Hello", { text: "lo", offset: 3 }), "Hello");
  // Deltas we never saw: what we hold stays, the new one follows.
  assert.equal(applyOutput("He", { text: "!", offset: 9 }), "He!");
});

test("offsets count characters, not UTF-16 units", () => {
  // "🙂" is one character for the server (Python) and two units for JavaScript.
  let text = applyOutput("", { text: "a🙂b", offset: 0 });
  text = applyOutput(text, { text: "c", offset: 3 });
  assert.equal(text, "a🙂bc");
  assert.equal(applyOutput(text, { text: "X", offset: 2 }), "a🙂X");
});

test("StepTexts: snapshot text, then deltas; a new attempt's first delta clears the old text", () => {
  const texts = new StepTexts();
  texts.apply({
    type: "snapshot",
    data: { attempt: 1, steps: [{ index: 1, name: "prepare", text: null }, { index: 2, name: "write", text: "wörd🙂 " }] },
  });
  assert.equal(texts.text(2), "wörd🙂 ");
  const change = texts.apply(output("two ", 6));
  assert.deepEqual(change, { index: 2, name: "write", text: "wörd🙂 two ", delta: "two ", attempt: 1, restarted: false });
  // The worker died; the next attempt streams the step again from its start.
  const restart = texts.apply(output("again ", 0, 2));
  assert.equal(restart.restarted, true);
  assert.equal(restart.attempt, 2);
  assert.equal(texts.text(2), "again ");
  assert.equal(texts.text(1), "");
});

test("StepTexts: a step that starts again is emptied before its first delta", () => {
  const texts = new StepTexts();
  texts.apply(output("old text", 0, 1));
  const change = texts.apply({ type: "step", data: { type: "step", step: WRITE, attempt: 2 } });
  assert.equal(change.restarted, true);
  assert.equal(texts.text(2), "");
  assert.equal(texts.apply({ type: "progress", data: { current: 1, total: 2 } }), null);
});

test("watchJob: onText follows the text over a real stream, and text(i) holds it", async () => {
  const frames = [
    ["snapshot", "1-0", { id: "J", state: "running", attempt: 1, last_event_id: "1-0", steps: [{ index: 2, name: "write", text: "Hel" }] }],
    ["output", "2-0", { job_id: "J", type: "output", step: WRITE, text: "lo ", offset: 3, attempt: 1 }],
    ["output", "3-0", { job_id: "J", type: "output", step: WRITE, text: "wörld🙂", offset: 6, attempt: 1 }],
    ["output", "4-0", { job_id: "J", type: "output", step: WRITE, text: "!", offset: 12, attempt: 1 }],
    ["completed", "5-0", { job_id: "J", type: "completed", result: "Hello wörld🙂!" }],
  ];
  const server = http.createServer((req, res) => {
    if (req.url.startsWith("/api/jobs/J/events")) {
      res.writeHead(200, { "content-type": "text/event-stream" });
      for (const [type, id, data] of frames) res.write(`id: ${id}\nevent: ${type}\ndata: ${JSON.stringify(data)}\n\n`);
      res.end();
    } else {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ id: "J", state: "completed", last_event_id: "5-0" }));
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  try {
    const changes = [];
    let watch;
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no end")), 5000);
      watch = watchJob("J", {
        baseUrl: `http://127.0.0.1:${server.address().port}/`,
        onText: (change) => changes.push(change.text),
        onEnd: () => {
          clearTimeout(timer);
          resolve();
        },
        onError: reject,
      });
    });
    assert.deepEqual(changes, ["Hello ", "Hello wörld🙂", "Hello wörld🙂!"]);
    assert.equal(watch.text(2), "Hello wörld🙂!");
  } finally {
    server.close();
  }
});
