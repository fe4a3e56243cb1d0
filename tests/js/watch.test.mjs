// watchJob and watchAll against a real HTTP server (node:http) that answers each request from a
// script: the resume, token and back-off rules seen from outside, over real fetch and sockets.
import assert from "node:assert/strict";
import http from "node:http";
import { test } from "node:test";

import { UNREACHABLE_HINT, watchAll, watchJob } from "../../static/stepstream.js";

const JOB = "J1";
const RECORD = { id: JOB, state: "completed", last_event_id: "5-0", result: { ok: true } };

/** A server answering request n with script[n]; every request is logged. */
async function scripted(script, prefix = "") {
  const requests = [];
  const sockets = new Set();
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://localhost");
    const entry = {
      path: url.pathname.slice(prefix.length),
      after: url.searchParams.get("after"),
      token: url.searchParams.get("token"),
      accept: req.headers.accept,
      at: Date.now(),
    };
    requests.push(entry);
    const answer = script[requests.length - 1];
    if (!answer) {
      res.writeHead(500, { "content-type": "application/json" });
      res.end('{"error":{"code":"unscripted","message":"no answer scripted"}}');
      return;
    }
    answer(res, entry, req);
  });
  server.on("connection", (socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const base = `http://127.0.0.1:${server.address().port}${prefix}`;
  return {
    base,
    requests,
    close: () =>
      new Promise((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(resolve);
      }),
  };
}

const frame = (type, id, data = {}) =>
  `${id ? `id: ${id}\n` : ""}event: ${type}\ndata: ${JSON.stringify({ job_id: JOB, type, ...data })}\n\n`;

/** An SSE answer: `retry:` first, the frames, then `end` ("end", "destroy" or "hold"). */
const stream =
  (frames, end = "end") =>
  (res) => {
    res.writeHead(200, { "content-type": "text/event-stream; charset=utf-8" });
    res.write("retry: 20\n\n");
    for (const f of frames) res.write(f);
    if (end === "end") res.end();
    // Broken mid-stream, once what was written has had time to arrive.
    else if (end === "destroy") setTimeout(() => res.socket.destroy(), 100);
  };

const json =
  (status, body, headers = {}) =>
  (res) => {
    res.writeHead(status, { "content-type": "application/json", ...headers });
    res.end(JSON.stringify(body));
  };

const error = (status, code, headers = {}) =>
  json(status, { error: { code, message: `${code} (scripted)`, details: null } }, headers);

/** Run a watch until onEnd or onError; collects everything it reported. */
function run(start, { timeout = 10_000 } = {}) {
  const seen = { events: [], states: [], ends: [], errors: [], tokens: [] };
  return new Promise((resolve, reject) => {
    let stop;
    const timer = setTimeout(() => {
      stop?.();
      reject(new Error(`no end after ${timeout} ms: ${JSON.stringify(seen)}`));
    }, timeout);
    const done = () => {
      clearTimeout(timer);
      // A little longer: a second onEnd or a stray event would show up here.
      setTimeout(() => resolve(seen), 100);
    };
    stop = start({
      onEvent: (event) => seen.events.push(event),
      onState: (state) => seen.states.push(state),
      onEnd: (record) => {
        seen.ends.push(record);
        done();
      },
      onError: (err) => {
        seen.errors.push(err);
        done();
      },
      getToken: async ({ jobId, reason }) => {
        seen.tokens.push({ jobId, reason });
        return `t${seen.tokens.length}`;
      },
    });
    seen.stop = stop;
  });
}

test("every event once across token_expired, a dropped connection, a 401; then onEnd once", async () => {
  const server = await scripted([
    stream([frame("queued", "1-0"), frame("started", "2-0"), frame("token_expired")]),
    // The renewed connection: the server replays 2-0 again (an overlap), then breaks.
    stream([frame("started", "2-0"), frame("step", "3-0", { step: { index: 1 } })], "destroy"),
    error(401, "token_expired"), // t2 ran out meanwhile
    stream([frame("progress", "4-0"), frame("completed", "5-0", { result: { ok: true } })], "hold"),
    json(200, RECORD),
  ]);
  try {
    const seen = await run((callbacks) =>
      watchJob(JOB, { ...callbacks, baseUrl: server.base, after: "0" }),
    );
    assert.deepEqual(seen.errors, []);
    assert.deepEqual(
      seen.events.map((e) => [e.id, e.type]),
      [
        ["1-0", "queued"],
        ["2-0", "started"],
        ["3-0", "step"],
        ["4-0", "progress"],
        ["5-0", "completed"],
      ],
    );
    assert.deepEqual(seen.events[2].data.step, { index: 1 });
    assert.deepEqual(seen.ends, [RECORD]);
    assert.deepEqual(
      seen.tokens.map((t) => t.reason),
      ["connect", "expired", "unauthorized"],
    );
    assert.ok(seen.tokens.every((t) => t.jobId === JOB));
    assert.deepEqual(
      server.requests.map((r) => [r.path, r.after, r.token]),
      [
        [`/api/jobs/${JOB}/events`, "0", "t1"],
        [`/api/jobs/${JOB}/events`, "2-0", "t2"],
        [`/api/jobs/${JOB}/events`, "3-0", "t2"], // a drop keeps the token
        [`/api/jobs/${JOB}/events`, "3-0", "t3"],
        [`/api/jobs/${JOB}`, null, "t3"], // the final record, with the job's token
      ],
    );
    assert.equal(server.requests[0].accept, "text/event-stream");
    assert.equal(seen.states[0], "connecting");
    assert.equal(seen.states.at(-1), "closed");
    assert.ok(seen.states.includes("reconnecting"), seen.states);
    // A token renewal is planned: it does not show as a dropped connection.
    assert.deepEqual(seen.states.slice(0, 3), ["connecting", "live", "reconnecting"]);
  } finally {
    await server.close();
  }
});

test("a 204 ends the watch: the record is fetched and onEnd called once", async () => {
  const server = await scripted([(res) => res.writeHead(204).end(), json(200, RECORD)]);
  try {
    const seen = await run(({ getToken, ...callbacks }) =>
      watchJob(JOB, { ...callbacks, baseUrl: server.base, after: "5-0" }),
    );
    assert.deepEqual(seen.events, []);
    assert.deepEqual(seen.ends, [RECORD]);
    assert.deepEqual(
      server.requests.map((r) => [r.path, r.after, r.token]),
      [
        [`/api/jobs/${JOB}/events`, "5-0", null], // without getToken: no token
        [`/api/jobs/${JOB}`, null, null],
      ],
    );
  } finally {
    await server.close();
  }
});

test("a finished job's snapshot is the final record: no fetch", async () => {
  const snapshot = `id: 5-0\nevent: snapshot\ndata: ${JSON.stringify(RECORD)}\n\n`;
  const server = await scripted([stream([snapshot], "hold")]);
  try {
    const seen = await run((callbacks) => watchJob(JOB, { ...callbacks, baseUrl: server.base }));
    assert.deepEqual(seen.events, [{ id: "5-0", type: "snapshot", data: RECORD }]);
    assert.deepEqual(seen.ends, [RECORD]);
    assert.equal(server.requests.length, 1);
    assert.equal(server.requests[0].after, null, "a fresh watch sends no cursor");
  } finally {
    await server.close();
  }
});

test("a 429 waits out its Retry-After; a 503 backs off; then the watch goes on", async () => {
  const server = await scripted([
    error(429, "too_many_streams", { "retry-after": "1" }),
    error(503, "unavailable"),
    stream([frame("completed", "5-0")]),
    json(200, RECORD),
  ]);
  try {
    const seen = await run((callbacks) =>
      watchJob(JOB, { ...callbacks, baseUrl: server.base, after: "4-0" }),
    );
    assert.deepEqual(seen.errors, []);
    assert.deepEqual(seen.ends, [RECORD]);
    const [first, second, third] = server.requests;
    assert.ok(second.at - first.at >= 950, `retried ${second.at - first.at} ms after a 429`);
    assert.ok(third.at - second.at >= 150, `retried ${third.at - second.at} ms after a 503`);
    assert.deepEqual(seen.tokens.map((t) => t.reason), ["connect"], "one token was enough");
  } finally {
    await server.close();
  }
});

test("a 404 ends the watch with onError, and nothing else", async () => {
  const server = await scripted([error(404, "job_not_found")]);
  try {
    const seen = await run((callbacks) => watchJob(JOB, { ...callbacks, baseUrl: server.base }));
    assert.equal(seen.errors.length, 1);
    assert.equal(seen.errors[0].status, 404);
    assert.equal(seen.errors[0].code, "job_not_found");
    assert.equal(seen.errors[0].message, "job_not_found (scripted)");
    assert.deepEqual(seen.ends, []);
    assert.deepEqual(seen.states, ["connecting", "closed"]);
    assert.equal(server.requests.length, 1);
  } finally {
    await server.close();
  }
});

test("a 401 with a token fetched just now ends with onError", async () => {
  const server = await scripted([
    stream([frame("queued", "1-0")], "end"),
    error(401, "unauthorized"), // the kept token is refused: renew once
    error(401, "unauthorized"), // the fresh one too: give up
  ]);
  try {
    const seen = await run((callbacks) => watchJob(JOB, { ...callbacks, baseUrl: server.base }));
    assert.equal(seen.errors.length, 1);
    assert.equal(seen.errors[0].status, 401);
    assert.deepEqual(seen.tokens.map((t) => t.reason), ["connect", "unauthorized"]);
    assert.deepEqual(seen.events.map((e) => e.id), ["1-0"]);
    assert.equal(server.requests.length, 3);
  } finally {
    await server.close();
  }
});

test("a fresh token that ran out before the server saw it is renewed, not an error", async () => {
  // The page's token was fetched while the server was away (a restart): by the time the server
  // answers, it has expired. The example app's page used to stop watching here for good.
  const server = await scripted([
    stream([frame("queued", "1-0")], "end"),
    error(401, "unauthorized"), // the kept token is refused: renew
    error(401, "token_expired"), // the fresh one ran out before it was used: renew again
    stream([frame("completed", "5-0")]),
    json(200, RECORD),
  ]);
  try {
    const seen = await run((callbacks) => watchJob(JOB, { ...callbacks, baseUrl: server.base }));
    assert.deepEqual(seen.errors, []);
    assert.deepEqual(seen.ends, [RECORD]);
    assert.deepEqual(seen.tokens.map((t) => t.reason), ["connect", "unauthorized", "expired"]);
    assert.deepEqual(seen.events.map((e) => e.id), ["1-0", "5-0"]);
    assert.equal(server.requests[3].token, "t3");
  } finally {
    await server.close();
  }
});

test("fresh tokens that keep arriving expired are renewed after a back-off", async () => {
  const server = await scripted([
    error(401, "token_expired"),
    error(401, "token_expired"),
    stream([frame("completed", "5-0")]),
    json(200, RECORD),
  ]);
  try {
    const seen = await run((callbacks) => watchJob(JOB, { ...callbacks, baseUrl: server.base }));
    assert.deepEqual(seen.ends, [RECORD]);
    assert.deepEqual(seen.tokens.map((t) => t.reason), ["connect", "expired", "expired"]);
    const [, second, third] = server.requests.map((r) => r.at);
    // The back-off before any stream has opened: 250 ms, less at most 20 % of jitter.
    assert.ok(third - second >= 190, `the second expiry was renewed after ${third - second} ms`);
  } finally {
    await server.close();
  }
});

test("getToken failing is retried, like an unreachable server", async () => {
  const server = await scripted([stream([frame("completed", "5-0")]), json(200, RECORD)]);
  try {
    let calls = 0;
    const seen = await run((callbacks) =>
      watchJob(JOB, {
        ...callbacks,
        baseUrl: server.base,
        getToken: async () => {
          calls += 1;
          if (calls === 1) throw new Error("token endpoint down");
          return "good";
        },
      }),
    );
    assert.deepEqual(seen.ends, [RECORD]);
    assert.equal(calls, 2);
    assert.equal(server.requests[0].token, "good");
  } finally {
    await server.close();
  }
});

test("a silent stream is dropped after idleTimeout and resumed from its cursor", async () => {
  const server = await scripted([
    stream([frame("queued", "1-0")], "hold"), // then nothing, not even a heartbeat
    stream([frame("completed", "2-0")]),
    json(200, RECORD),
  ]);
  try {
    const seen = await run((callbacks) =>
      watchJob(JOB, { ...callbacks, baseUrl: server.base, after: "0", idleTimeout: 300 }),
    );
    assert.deepEqual(seen.events.map((e) => e.id), ["1-0", "2-0"]);
    assert.equal(server.requests[1].after, "1-0");
    assert.ok(server.requests[1].at - server.requests[0].at >= 280);
  } finally {
    await server.close();
  }
});

test("a prefix in baseUrl is kept: /progress/api/...", async () => {
  const server = await scripted([stream([frame("completed", "5-0")]), json(200, RECORD)], "/progress");
  try {
    const seen = await run(({ getToken, ...callbacks }) =>
      watchJob(JOB, { ...callbacks, baseUrl: server.base, after: "0" }),
    );
    assert.deepEqual(seen.ends, [RECORD]);
    assert.ok(server.base.endsWith("/progress"));
    assert.deepEqual(
      server.requests.map((r) => r.path),
      [`/api/jobs/${JOB}/events`, `/api/jobs/${JOB}`],
    );
  } finally {
    await server.close();
  }
});

test("nothing listening: connecting, then offline; stop() ends it quietly", async () => {
  const server = await scripted([]);
  const base = server.base;
  await server.close(); // the port is free now: every connect is refused
  const states = [];
  const events = [];
  const stop = watchAll({ baseUrl: base, onState: (s) => states.push(s), onEvent: (e) => events.push(e), offlineAfter: 300 });
  await new Promise((resolve) => setTimeout(resolve, 700));
  assert.deepEqual(states, ["connecting", "offline"]);
  stop();
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.deepEqual(states, ["connecting", "offline"], "no callback after stop()");
  assert.deepEqual(events, []);
});

test("the firehose: its cursor from an id-only frame, a reset, and reconnects", async () => {
  const server = await scripted([
    stream(["id: 100-0\n\n", frame("queued", "101-0"), frame("completed", "102-0")], "end"),
    stream([`event: reset\ndata: {"reason":"trimmed"}\n\n`, frame("started", "50-0")], "end"),
    stream([frame("step", "51-0")], "hold"),
  ]);
  const seen = [];
  const states = [];
  const stop = watchAll({
    baseUrl: server.base,
    onEvent: (e) => seen.push([e.id, e.type]),
    onState: (s) => states.push(s),
  });
  try {
    const deadline = Date.now() + 5000;
    while (seen.length < 5 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(seen, [
      ["101-0", "queued"],
      ["102-0", "completed"], // the firehose goes on after a terminal event
      [null, "reset"],
      ["50-0", "started"], // after a reset every id is new
      ["51-0", "step"],
    ]);
    assert.deepEqual(
      server.requests.map((r) => [r.path, r.after]),
      [
        ["/api/events", null],
        ["/api/events", "102-0"],
        ["/api/events", "50-0"],
      ],
    );
    assert.equal(states.at(-1), "live");
  } finally {
    stop();
    await server.close();
  }
});

test("no answer three times: onError with fatal false, and the watch goes on to its next answer", async () => {
  let attempts = 0;
  const reports = [];
  const refusedThrice = async () => {
    attempts += 1;
    if (attempts <= 3) throw new TypeError("Failed to fetch");
    const body = JSON.stringify({ error: { code: "job_not_found", message: "gone", details: null } });
    return new Response(body, { status: 404, headers: { "content-type": "application/json" } });
  };
  const seen = await run(({ getToken, onError, ...callbacks }) =>
    watchJob(JOB, {
      ...callbacks,
      baseUrl: "http://127.0.0.1:9/",
      fetch: refusedThrice,
      // Only the fatal error ends the run; the report before it is kept.
      onError: (err) => (err.fatal ? onError(err) : reports.push(err)),
    }),
  );
  assert.equal(attempts, 4);
  assert.equal(reports.length, 1);
  const [report] = reports;
  assert.equal(report.fatal, false);
  assert.equal(report.code, "unreachable");
  assert.equal(report.status, 0);
  assert.ok(report.message.startsWith(UNREACHABLE_HINT), report.message);
  assert.equal(report.cause.message, "Failed to fetch");
  assert.deepEqual(seen.errors.map((e) => [e.fatal, e.status]), [[true, 404]]);
  assert.deepEqual(seen.states, ["connecting", "closed"]);
});
