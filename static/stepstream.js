// Stepstream's browser client: watch one job's progress, or every job's, from any page.
//
// An ES module with no dependencies and no build step. Every Stepstream web process serves it at
// `/stepstream.js`; the same file is the npm package. It follows a stream over as many HTTP
// connections as it takes (dropped connections, web restarts, 429s, token renewals) and hands
// each stored event to `onEvent` exactly once, in log order.
//
// It reads streams with fetch() rather than EventSource: EventSource cannot see a status code or
// `Retry-After`, and gives up for good on any non-200 answer. The resume rules are those of the
// Python client (stepstream/_sse.py) and docs/protocol.md: the cursor is the id of the last event
// delivered, sent as `?after=` (a header would cost a CORS preflight on every reconnect).
//
// The parts below `watchJob`/`watchAll` need no browser (SseParser, Follower, Backoff,
// parseRetryAfter, compareIds, StepTexts, applyOutput, applyEvent, RecordFold, and WatchLoop,
// the connection loop as a state machine that `watch()` drives): Node's test runner drives
// them directly (tests/js/).

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const DEFAULT_RETRY_MS = 1000;
const OFFLINE_AFTER_MS = 15_000;
// The server sends a heartbeat at least every 15 s; three missed ones mean a dead connection.
const IDLE_TIMEOUT_MS = 45_000;
// A stream that lasted this long before it ended was working: reconnect at once.
const HEALTHY_MS = 5_000;
// Attempts in a row that got no answer at all before `onError` hears of it (not fatal). A
// browser shows a refused CORS answer to the page as a network error, nothing more.
export const UNREACHABLE_AFTER = 3;
export const UNREACHABLE_HINT =
  "could not connect: a network error, or this page's origin is not in STEPSTREAM_CORS_ORIGINS";

/**
 * What `onError` gets. `fatal` (the default) means the watch is over; `fatal: false` is a
 * report while the watch goes on trying (`code` "unreachable": no answer, several times in a
 * row).
 */
export class StepstreamError extends Error {
  constructor(message, { status = 0, code = "error", details = null, fatal = true, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "StepstreamError";
    this.status = status;
    this.code = code;
    this.details = details;
    this.fatal = fatal;
  }
}

// -- Pure parts -----------------------------------------------------------------------------

/**
 * The SSE wire format (the WHATWG "event stream" rules), fed text as it arrives in any
 * chunking. `push` returns the complete frames: `{event, data, id, retry}`, where `id` is the
 * frame's own `id:` field (null without one) and `retry` its `retry:` (null without one).
 * Comments (heartbeats) produce nothing. A frame with fields but no `data:` is still returned:
 * an `id:` alone moves the cursor.
 */
export class SseParser {
  constructor() {
    this._buffer = "";
    this._skipLF = false;
    this._started = false;
    this._clear();
  }

  _clear() {
    this._event = "";
    this._data = null;
    this._id = null;
    this._retry = null;
    this._any = false;
  }

  push(chunk) {
    let text = chunk;
    if (!this._started && text) {
      this._started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    if (this._skipLF && text) {
      // A "\r\n" split across two chunks: the "\r" ended the line already.
      if (text[0] === "\n") text = text.slice(1);
      this._skipLF = false;
    }
    text = this._buffer + text;
    const frames = [];
    const lineEnd = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = lineEnd.exec(text)) !== null) {
      if (match[0] === "\r" && match.index === text.length - 1) {
        this._skipLF = true; // its "\n" may be the next chunk's first character
      }
      this._line(text.slice(start, match.index), frames);
      start = lineEnd.lastIndex;
    }
    this._buffer = text.slice(start);
    return frames;
  }

  _line(line, frames) {
    if (line === "") {
      if (this._any) {
        frames.push({
          event: this._event || "message",
          data: this._data === null ? "" : this._data.join("\n"),
          id: this._id,
          retry: this._retry,
        });
      }
      this._clear();
      return;
    }
    if (line[0] === ":") return; // a comment: the heartbeat
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "event") this._event = value;
    else if (field === "data") (this._data ??= []).push(value);
    else if (field === "id") {
      if (value.includes("\0")) return;
      this._id = value || null;
    } else if (field === "retry") {
      if (!/^\d+$/.test(value)) return;
      this._retry = Number(value);
    } else return; // unknown fields are ignored
    this._any = true;
  }
}

const STREAM_ID = /^(\d{1,20})-(\d{1,20})$/;

function parts(id) {
  if (id === "0") return ["0", "0"];
  const match = typeof id === "string" ? STREAM_ID.exec(id) : null;
  return match ? [match[1].replace(/^0+(?=.)/, ""), match[2].replace(/^0+(?=.)/, "")] : null;
}

function compareDigits(a, b) {
  if (a.length !== b.length) return a.length < b.length ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * Order of two event ids (`0` or `<ms>-<seq>`): -1, 0 or 1; null when either is not an id.
 * Compared as digit strings, so no precision is lost on 20-digit parts.
 */
export function compareIds(a, b) {
  const x = parts(a);
  const y = parts(b);
  if (!x || !y) return null;
  return compareDigits(x[0], y[0]) || compareDigits(x[1], y[1]);
}

/**
 * One logical stream over as many connections as it takes: the cursor, what each frame means,
 * and when the stream is over. `ends` is true for one job's stream (it ends at the terminal
 * event), false for the firehose (endless).
 *
 * `accept(frame)` returns `{event, renew}`: `event` is `{id, type, data}` to deliver (or null),
 * `renew` is true when the server ended the stream because the token expired.
 */
export class Follower {
  constructor({ ends, after = null }) {
    this.ends = ends;
    this.cursor = after === null || after === undefined || after === "" ? null : String(after);
    this.retryMs = DEFAULT_RETRY_MS;
    this.finished = false;
    this.finalRecord = null; // a terminal snapshot: the record onEnd gets, no fetch needed
    this.delivered = 0; // events delivered on the current connection
  }

  connectionOpened() {
    this.delivered = 0;
  }

  /** 204: the cursor is the job's terminal event; there is nothing more, ever. */
  noContent() {
    this.finished = true;
  }

  accept(frame) {
    if (frame.retry !== null) this.retryMs = frame.retry;
    if (frame.event === "token_expired") return { event: null, renew: true };
    if (frame.event === "message" && frame.data === "") {
      // A frame with only `retry:`, or only `id:`: a position with no event (the firehose
      // sends one first), as EventSource treats it: the cursor moves, nothing is delivered.
      if (frame.id !== null && this._isNew(frame.id)) this.cursor = frame.id;
      return { event: null, renew: false };
    }
    // A `reset` carries no id: it moves no cursor.
    const id = frame.event === "reset" ? null : frame.id;
    if (id !== null && !this._isNew(id)) return { event: null, renew: false };
    let data;
    try {
      data = frame.data === "" ? {} : JSON.parse(frame.data);
    } catch {
      data = frame.data; // the server sends JSON only; keep what came rather than lose it
    }
    const event = { id, type: frame.event, data };
    if (id !== null) this.cursor = id;
    this.delivered += 1;
    if (this.ends) {
      if (TERMINAL.has(event.type)) this.finished = true;
      else if (event.type === "snapshot" && TERMINAL.has(data?.state)) {
        this.finished = true;
        this.finalRecord = data;
      }
    } else if (event.type === "reset") {
      // The firehose goes on from its oldest entry kept: every id after 0 is new.
      this.cursor = "0";
    }
    return { event, renew: false };
  }

  _isNew(id) {
    // The server never repeats an id on one stream; this guards a resume that overlaps.
    if (this.cursor === null) return true;
    const order = compareIds(id, this.cursor);
    return order === null || order > 0;
  }
}

/**
 * How long to wait before the next connection (milliseconds), as the Python client's
 * Reconnector: a stream that worked for a while is resumed at once; failures back off from the
 * server's `retry:` (250 ms before the first success) doubling up to `maxMs`, with jitter so the
 * viewers of a restarted server do not all come back at once, and never sooner than a
 * `Retry-After`. The browser never gives up: a page keeps trying until it is closed.
 */
export class Backoff {
  constructor({ initialMs = 250, maxMs = 10_000, random = Math.random } = {}) {
    this.initialMs = initialMs;
    this.maxMs = maxMs;
    this.random = random;
    this.everOpened = false;
    this.failures = 0;
    this.openedAt = 0;
  }

  opened(now) {
    this.everOpened = true;
    this.openedAt = now;
  }

  /** An open stream ended or broke. */
  dropped({ delivered, retryMs, now }) {
    if (delivered > 0 || now - this.openedAt >= HEALTHY_MS) {
      this.failures = 0;
      return 0;
    }
    // Opened and closed at once with nothing new: back off, or this would spin.
    return this.failed({ retryMs });
  }

  /** An attempt failed: refused, a network error, a 5xx, a 429 (with its Retry-After). */
  failed({ retryMs = DEFAULT_RETRY_MS, retryAfterMs = null } = {}) {
    this.failures += 1;
    const base = this.everOpened ? retryMs : this.initialMs;
    const delay = Math.min(this.maxMs, base * 2 ** Math.min(this.failures - 1, 16));
    return Math.max(delay * (0.8 + 0.2 * this.random()), retryAfterMs ?? 0);
  }
}

/** `Retry-After` (delta-seconds or an HTTP date) in milliseconds; null when absent or bad. */
export function parseRetryAfter(value, now = Date.now()) {
  if (value === null || value === undefined) return null;
  const text = String(value).trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const at = Date.parse(text);
  return Number.isNaN(at) ? null : Math.max(0, at - now);
}

// Offsets of `output` events count characters as Python does (code points), not UTF-16 units.
const SURROGATE = /[\uD800-\uDFFF]/;

function codePointLength(text) {
  return SURROGATE.test(text) ? Array.from(text).length : text.length;
}

function codePointPrefix(text, count) {
  return SURROGATE.test(text) ? Array.from(text).slice(0, count).join("") : text.slice(0, count);
}

/**
 * A step's text after one `output` event: the first `offset` characters of `text` and the
 * delta. Offset 0 starts the text over (a new attempt of the step); an offset past what we
 * hold (deltas we never saw) keeps what we hold and adds the delta.
 */
export function applyOutput(text, data) {
  const current = typeof text === "string" ? text : "";
  const delta = typeof data?.text === "string" ? data.text : "";
  const offset = Number(data?.offset) || 0;
  if (offset <= 0) return delta;
  const length = codePointLength(current);
  if (offset === length) return current + delta;
  return (offset < length ? codePointPrefix(current, offset) : current) + delta;
}

/**
 * The text of each step of one job, from its events: a `snapshot` gives the text so far, each
 * `output` continues it, a step's start (`step`) empties it. `apply(event)` returns what changed
 * (`{index, name, text, delta, attempt, restarted}`) or null.
 */
export class StepTexts {
  constructor() {
    this.steps = new Map(); // index -> {index, name, text, attempt}
  }

  text(index) {
    return this.steps.get(index)?.text ?? "";
  }

  apply(event) {
    const data = event?.data;
    if (!data || typeof data !== "object") return null;
    if (event.type === "snapshot") {
      for (const step of data.steps || []) {
        if (typeof step.text === "string") {
          this.steps.set(step.index, { index: step.index, name: step.name, text: step.text, attempt: data.attempt });
        }
      }
      return null;
    }
    const ref = data.step;
    if (!ref || typeof ref.index !== "number") return null;
    const known = this.steps.get(ref.index);
    if (event.type === "step") {
      if (!known?.text) return null;
      this.steps.set(ref.index, { index: ref.index, name: ref.name, text: "", attempt: data.attempt });
      return { index: ref.index, name: ref.name, text: "", delta: "", attempt: data.attempt, restarted: true };
    }
    if (event.type !== "output") return null;
    const text = applyOutput(known?.text, data);
    const restarted = Boolean(known?.text) && Number(data.offset) === 0;
    this.steps.set(ref.index, { index: ref.index, name: ref.name, text, attempt: data.attempt });
    return { index: ref.index, name: ref.name, text, delta: data.text, attempt: data.attempt, restarted };
  }
}

// -- The job record, folded from its events ------------------------------------------------

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, value));
}

function setStep(record, ref, patch) {
  if (!Array.isArray(record.steps)) record.steps = [];
  const at = ref.index - 1;
  const current = record.steps.find((s) => s.index === ref.index);
  const next = { index: ref.index, name: ref.name, state: "pending", ...(current || {}), ...patch };
  if (current) record.steps[record.steps.indexOf(current)] = next;
  else {
    record.steps.push(next);
    record.steps.sort((x, y) => x.index - y.index);
  }
  return at;
}

function interruptRunningStep(record, state, at) {
  for (const step of record.steps || []) {
    if (step.state === "running") {
      step.state = state;
      step.finished_at = at;
    }
  }
}

/**
 * Apply one stored event (an event's `data`) to a record, as the worker projects it (docs/protocol.md,
 * "Events"): mutates the record and returns it. `eventId` is the event's id in its job's
 * log. The dashboard folds its records with this too.
 */
export function applyEvent(record, event, eventId) {
  const at = event.at;
  switch (event.type) {
    case "queued":
      // A job submitted with a start time waits as "scheduled" until a worker starts it.
      record.state = event.run_at ? "scheduled" : "queued";
      if (event.run_at) record.run_at = event.run_at;
      if (event.cached) record.cached = true;
      if (event.reason === "retry") {
        record.error = null;
        record.result = null;
        record.finished_at = null;
        record.retry_at = null;
        record.message = null;
      }
      break;
    case "started":
      record.state = "running";
      record.attempt = event.attempt;
      if (event.max_attempts) record.max_attempts = event.max_attempts;
      record.started_at = record.started_at || at;
      record.error = null;
      record.retry_at = null;
      record.waiting_for = null; // a parent resumed by its children's last end
      break;
    case "step": {
      const ref = event.step;
      record.step = ref;
      record.progress = (ref.index - 1) / ref.count;
      record.message = null;
      setStep(record, ref, {
        state: "running",
        started_at: at,
        finished_at: null,
        duration_ms: null,
        output: null,
        text: null, // a step that runs again writes its text again
      });
      break;
    }
    case "output": {
      // A delta of the step's streamed text, at its offset (0: the step started over).
      const current = (record.steps || []).find((s) => s.index === event.step.index);
      setStep(record, event.step, { text: applyOutput(current?.text, event) });
      break;
    }
    case "progress": {
      // Two items ending together may report out of order ("11 of 12" after "12 of 12"):
      // a batch's count only goes up.
      if (event.counts && record.batch && event.counts.done < (record.batch.done ?? 0)) break;
      const count = record.step?.count || 1;
      const index = record.step?.index || 1;
      const fraction = event.total > 0 ? clamp(event.current / event.total, 0, 1) : 0;
      record.progress = (index - 1 + fraction) / count;
      record.message = event.message ?? null;
      if (event.counts) record.batch = event.counts; // a batch parent: one report per item
      break;
    }
    case "log":
      if (event.usage) addUsage(record, event.usage); // one answered LLM call
      break;
    case "step_completed": {
      const ref = event.step;
      setStep(record, ref, {
        state: event.restored ? "restored" : "completed",
        finished_at: at,
        duration_ms: event.duration_ms ?? null,
        output: event.output ?? null,
        ...(event.usage ? { usage: event.usage } : {}),
      });
      if (event.restored) record.step = ref;
      record.progress = ref.index / ref.count;
      break;
    }
    case "retrying":
      record.state = "retrying";
      record.error = event.error || null;
      record.retry_at = event.retry_at || null;
      if (event.max_attempts) record.max_attempts = event.max_attempts;
      record.message = `Attempt ${event.attempt} of ${event.max_attempts} failed; retrying`;
      interruptRunningStep(record, "failed", at);
      break;
    case "waiting": {
      // The run ended in wait_for_input, or waits for its child jobs (`children`: their
      // counts): no worker holds the job until the input is given or the children end.
      const { type, job_id, at: _, attempt, ...request } = event;
      record.state = "waiting";
      record.waiting_for = request;
      record.attempt = Math.max(0, attempt - 1); // a wait costs no attempt
      if (request.children) {
        record.children = { ...(record.children || {}), ...request.children };
        const left = request.children.size - request.children.done;
        record.message = `Waiting for ${left} child job${left === 1 ? "" : "s"}`;
      } else record.message = request.prompt || `Waiting for input ${request.name}`;
      interruptRunningStep(record, "waiting", at);
      break;
    }
    case "child": {
      // On a parent: a child job started (no counts) or ended (the parent's counts so far,
      // and its rolled-up progress while it waits). Counts only go up.
      if (!event.counts || event.counts.done < (record.children?.done ?? 0)) break;
      record.children = { ...(record.children || {}), ...event.counts };
      if (record.state !== "running") {
        if (typeof event.progress === "number") record.progress = event.progress;
        if (event.message) record.message = event.message;
      }
      break;
    }
    case "input":
      record.state = "queued";
      record.waiting_for = null;
      record.answers = { ...(record.answers || {}), [event.name]: { value: event.value, by: event.by, at } };
      record.message = null;
      break;
    case "completed":
      record.state = "completed";
      if (event.cached) record.cached = true;
      record.result = event.result ?? null;
      record.progress = 1;
      if (record.batch && event.result && typeof event.result.size === "number") {
        // A batch ends with its final counts: "50 of 50 done (2 failed)".
        record.batch = { ...record.batch, ...event.result, done: event.result.size };
        record.message = batchSummary(record.batch);
      } else if (!record.batch) record.message = null;
      record.finished_at = at;
      break;
    case "failed":
      record.state = "failed";
      record.error = event.error || null;
      record.finished_at = at;
      record.retry_at = null;
      interruptRunningStep(record, "failed", at);
      break;
    case "cancelled":
      record.state = "cancelled";
      record.finished_at = at;
      record.retry_at = null;
      record.cancel_reason = event.reason || null;
      record.waiting_for = null;
      interruptRunningStep(record, "cancelled", at);
      break;
    default:
      break;
  }
  if (eventId) record.last_event_id = eventId;
  return record;
}

function batchSummary(counts) {
  const extra = ["failed", "cancelled"].filter((k) => counts[k]).map((k) => `${counts[k]} ${k}`);
  return `${counts.done} of ${counts.size} done${extra.length ? ` (${extra.join(", ")})` : ""}`;
}

function addUsage(record, usage) {
  const total = { calls: 0, input_tokens: 0, output_tokens: 0, duration_ms: 0, ...(record.usage || {}) };
  total.calls += usage.calls ?? 1;
  total.input_tokens += usage.input_tokens || 0;
  total.output_tokens += usage.output_tokens || 0;
  total.duration_ms += usage.duration_ms || 0;
  record.usage = total;
  if (typeof usage.cost === "number") record.cost = (record.cost || 0) + usage.cost;
}

/** An empty projection for a job whose whole log is about to be replayed from the start. */
export function emptyProjection(record) {
  return {
    id: record.id,
    task: record.task,
    owner: record.owner,
    input: record.input,
    created_at: record.created_at,
    max_attempts: record.max_attempts,
    budget: record.budget ?? null,
    batch_id: record.batch_id ?? null,
    batch_index: record.batch_index ?? null,
    parent: record.parent ?? null,
    parent_index: record.parent_index ?? null,
    depth: record.depth ?? 0,
    children: null,
    batch: record.batch ? { ...record.batch, done: 0, completed: 0, failed: 0, cancelled: 0 } : null,
    usage: null,
    cost: 0,
    cached: false,
    run_at: null,
    state: "queued",
    step: null,
    progress: 0,
    message: null,
    steps: [],
    attempt: 0,
    error: null,
    result: null,
    retry_at: null,
    started_at: null,
    finished_at: null,
    last_event_id: null,
    waiting_for: null,
    answers: {},
  };
}

/**
 * One job's record as it is now, from its stream: a `snapshot` gives the whole record, each
 * later event is folded into it (applyEvent: state, step, progress, a step's streamed text, a
 * batch's counts). A stream read from the start (`after: "0"`) is folded from its `queued`
 * event. `apply(event)` returns the record when the event changed it, else null: a `reset`
 * (a snapshot follows), or an event with no record to fold it into yet (a watch that started
 * after an event id).
 */
export class RecordFold {
  constructor(jobId = null) {
    this.jobId = jobId;
    this.record = null;
  }

  apply(event) {
    const data = event?.data;
    if (!data || typeof data !== "object" || event.type === "reset") return null;
    if (event.type === "snapshot") {
      this.record = structuredClone(data);
      return this.record;
    }
    if (this.record === null) {
      if (event.type !== "queued") return null;
      this.record = emptyProjection({ id: data.job_id ?? this.jobId, input: data.input, created_at: data.at });
    }
    return applyEvent(this.record, data, event.id);
  }
}

// -- The connection loop, as a state machine -------------------------------------------------

// A token renewal this soon after its stream opened, with nothing delivered, backs off like a
// drop: fresh tokens that end their streams at once would otherwise spin.
const RENEW_SPIN_MS = 1000;

/** 429 and 5xx: the server is busy or away, not refusing; the watch tries again. */
function retriable(status) {
  return status === 429 || status >= 500;
}

/**
 * The watch's connection loop, with no I/O and no timers: `watch()` feeds it what happened and
 * carries out the actions it returns, in order. It owns the cursor (a Follower), the back-off
 * (a Backoff), the token rules and the connection state the page sees.
 *
 * States: "idle" (not started), "connecting" (a token or an answer awaited), "open" (a stream
 * being read), "renewing" / "finishing" (the stream is over, its connection closing: for a new
 * token / for the final record), "backing-off" (a `wait` under way), "done" (`end` returned)
 * and "closed" (`close()`, or `fail` returned). `target` is "stream" until the job's stream is
 * over, then "record" (the final record, fetched with the same token and back-off rules).
 *
 * Events, each returning the actions to take: `start()`; `tokenArrived(value)` / `tokenFailed()`;
 * `opened(now)`, `frame(frame)`, `ended(now)` (the open connection closed, or was dropped);
 * `unanswered(cause)` (no HTTP answer), `refused({status, error, retryAfterMs})` (a non-2xx);
 * `terminal()` (a 204); `record(record)`; `retry()` (a `wait` elapsed); `offline()` (the offline
 * timer fired); `fatal(error)`; `close()`.
 *
 * Actions, `{type, ...}`: "token" `{reason}`, "connect" `{params}`, "fetch-record" `{params}`
 * and "wait" `{ms}` are the next step (at most one, always last); "state" `{state}`, "deliver"
 * `{event}`, "unreachable" `{cause}` (the non-fatal report), "fail" `{error}`, "end" `{record}`,
 * "arm-offline", "disarm-offline", "abort" (the open connection) and "cancel-wait" are done at
 * once. Once "done" or "closed" every event returns no action.
 *
 * Exported for the tests (tests/js/loop.test.mjs); not part of the typed API (stepstream.d.ts).
 */
export class WatchLoop {
  constructor({ ends, after = null, tokens = false, backoff = new Backoff() }) {
    this.follower = new Follower({ ends, after });
    this.backoff = backoff;
    this.state = "idle";
    this.target = "stream";
    this.shown = null; // the ConnectionState the page was last told
    this.offlineArmed = false;
    this.token = null;
    this.tokenNeeded = tokens;
    this.tokens = tokens; // getToken was given
    this.tokenReason = "connect";
    this.tokenFresh = false; // fetched for this attempt, never yet accepted by the server
    this.freshRanOut = 0; // fresh tokens refused as expired since a stream last opened
    this.noAnswers = 0; // attempts in a row that got no HTTP answer (network error, CORS)
  }

  /** "done" or "closed": the watch is over. */
  get over() {
    return this.state === "done" || this.state === "closed";
  }

  start() {
    if (this.state !== "idle") return [];
    return [...this._show("connecting"), ...this._attempt()];
  }

  tokenArrived(value) {
    if (this.over) return [];
    this.token = value === null || value === undefined || value === "" ? null : String(value);
    this.tokenNeeded = false;
    this.tokenFresh = true;
    return this._attempt();
  }

  /** getToken threw: the page's token endpoint may be down for a moment, like the server. */
  tokenFailed() {
    if (this.over) return [];
    return [...this._down(), this._wait(this._failed())];
  }

  opened(now) {
    if (this.over) return [];
    this.state = "open";
    this.noAnswers = 0;
    this.tokenFresh = false;
    this.freshRanOut = 0;
    this.backoff.opened(now);
    this.follower.connectionOpened();
    return this._show("live");
  }

  frame(frame) {
    if (this.state !== "open") return [];
    const { event, renew } = this.follower.accept(frame);
    if (renew) this.state = "renewing";
    else if (this.follower.finished) this.state = "finishing";
    return event ? [{ type: "deliver", event }] : [];
  }

  ended(now) {
    if (this.state === "finishing") return this._finish();
    if (this.state === "renewing") {
      this.tokenNeeded = this.tokens;
      this.tokenReason = "expired";
      // A planned reconnect, at once; the same back-off as a drop if it comes too often.
      if (this.follower.delivered === 0 && now - this.backoff.openedAt < RENEW_SPIN_MS) {
        return [...this._down(), this._wait(this._failed())];
      }
      return this._attempt();
    }
    if (this.state !== "open") return [];
    const delay = this.backoff.dropped({
      delivered: this.follower.delivered,
      retryMs: this.follower.retryMs,
      now,
    });
    const down = this._down();
    return delay ? [...down, this._wait(delay)] : [...down, ...this._attempt()];
  }

  /** No HTTP answer at all; said once per run of them, while the watch goes on trying. */
  unanswered(cause) {
    if (this.over) return [];
    this.noAnswers += 1;
    const report = this.noAnswers === UNREACHABLE_AFTER ? [{ type: "unreachable", cause }] : [];
    return [...this._down(), ...report, this._wait(this._failed())];
  }

  /** A non-2xx answer: `error` is its StepstreamError (null for a 429 or a 5xx). */
  refused({ status, error = null, retryAfterMs = null }) {
    if (this.over) return [];
    this.noAnswers = 0;
    if (status === 401 && this.tokens) {
      // A kept token is renewed on any 401. A fresh one is renewed only if it ran out: it can
      // wait out its life while the server is away (a restart), but any other refusal would
      // come back for the next token too.
      const ranOut = this.tokenFresh && error?.code === "token_expired";
      if (this.tokenFresh && !ranOut) return this.fatal(error);
      this.tokenNeeded = true;
      this.tokenReason = ranOut ? "expired" : "unauthorized";
      // Fresh tokens that keep arriving expired (a clock or TTL problem): back off, no spin.
      if (ranOut && this.freshRanOut++ > 0) return [...this._down(), this._wait(this._failed())];
      return this._attempt();
    }
    if (retriable(status)) return [...this._down(), this._wait(this._failed(retryAfterMs))];
    return this.fatal(error);
  }

  /** 204: the cursor is the job's terminal event; there is nothing more, ever. */
  terminal() {
    if (this.over) return [];
    this.noAnswers = 0;
    this.follower.noContent();
    return this._finish();
  }

  record(record) {
    if (this.over) return [];
    this.noAnswers = 0;
    this.state = "done";
    if (record === null) return [];
    return [...this._show("closed"), { type: "end", record }];
  }

  retry() {
    return this.state === "backing-off" ? this._attempt() : [];
  }

  offline() {
    if (this.over || this.shown === "live" || this.shown === "closed") return [];
    return this._show("offline");
  }

  fatal(error) {
    if (this.over) return [];
    this.state = "closed";
    return [...this._show("closed"), { type: "fail", error }];
  }

  /** The page's stop(): no callback follows, whatever was under way is dropped. */
  close() {
    if (this.over) return [];
    const actions = this.offlineArmed ? [{ type: "disarm-offline" }] : [];
    this.offlineArmed = false;
    actions.push({ type: this.state === "backing-off" ? "cancel-wait" : "abort" });
    this.state = "closed";
    return actions;
  }

  // The next attempt: a token first when one is needed, then the stream or the final record.
  _attempt() {
    this.state = "connecting";
    if (this.tokenNeeded) return [{ type: "token", reason: this.tokenReason }];
    if (this.target === "record") return [{ type: "fetch-record", params: { token: this.token } }];
    return [{ type: "connect", params: { after: this.follower.cursor, token: this.token } }];
  }

  // The job's stream is over (its terminal event, a terminal snapshot, or a 204).
  _finish() {
    const final = this.follower.finalRecord;
    if (final) return this.record(final);
    this.target = "record";
    return this._attempt();
  }

  _failed(retryAfterMs = null) {
    return this.backoff.failed({ retryMs: this.follower.retryMs, retryAfterMs });
  }

  _wait(ms) {
    this.state = "backing-off";
    return { type: "wait", ms };
  }

  _show(next) {
    const actions = [];
    if ((next === "live" || next === "closed") && this.offlineArmed) {
      this.offlineArmed = false;
      actions.push({ type: "disarm-offline" });
    }
    if (next !== this.shown) {
      this.shown = next;
      actions.push({ type: "state", state: next });
    }
    return actions;
  }

  // Something went wrong; the watch goes on trying. After `offlineAfter` ms without a working
  // stream the state reads "offline" (the stream says so, not navigator.onLine).
  _down() {
    const actions = this._show(this.shown === "live" ? "reconnecting" : this.shown);
    if (!this.offlineArmed) {
      this.offlineArmed = true;
      actions.push({ type: "arm-offline" });
    }
    return actions;
  }
}

// -- The watch ------------------------------------------------------------------------------

/**
 * Watch one job: its events live (`onEvent`), the record as it is after each (`onRecord`), then
 * `onEnd(record)` once with the final record. Returns `stop()`.
 *
 * Without `after` the first event is a `snapshot` (the record now); with `after: "0"` the whole
 * stored log; with an event id, exactly the events after it.
 */
export function watchJob(jobId, options = {}) {
  if (typeof jobId !== "string" || !jobId) throw new TypeError("watchJob needs a job id");
  const path = `api/jobs/${encodeURIComponent(jobId)}`;
  const texts = new StepTexts();
  const fold = new RecordFold(jobId);
  const { onEvent = null, onText = null, onRecord = null, onEnd = null } = options;
  let snapshot = null; // the last snapshot's data: a terminal one is the final record
  let stopped = false; // a callback may stop the watch: the ones after it are not called
  // Each callback of one event in turn; one that throws does not keep the next from running
  // (the watch reports the error).
  const each = (...calls) => {
    let failure = null;
    for (const [callback, value] of calls) {
      if (stopped) break;
      if (!callback) continue;
      try {
        callback(value);
      } catch (error) {
        failure ??= error;
      }
    }
    if (failure) throw failure;
  };
  const stopWatch = watch({
    ...options,
    jobId,
    path: `${path}/events`,
    recordPath: path,
    onEvent: (event) => {
      const change = texts.apply(event);
      const record = onRecord ? fold.apply(event) : null;
      if (event.type === "snapshot") snapshot = event.data;
      each(
        [onEvent, event],
        [change && onText, change],
        // A copy each time: the page may keep it, or hand it to a framework's state.
        [record && onRecord, record && structuredClone(record)],
      );
    },
    onEnd: (record) => {
      // The server's final record is the last word, unless the snapshot that said it was.
      const again = onRecord && record !== snapshot;
      each([again && onRecord, again && structuredClone(record)], [onEnd, record]);
    },
  });
  const stop = () => {
    stopped = true;
    stopWatch();
  };
  stop.text = (index) => texts.text(index);
  return stop;
}

/** Watch every job the caller may see (the firehose): endless until `stop()`. */
export function watchAll(options = {}) {
  return watch({ ...options, jobId: null, path: "api/events", recordPath: null });
}

/** The API base URL, ending in "/": `baseUrl`, or the directory this module was loaded from. */
export function resolveBaseUrl(baseUrl) {
  const page = globalThis.location?.href;
  let url;
  if (baseUrl === undefined || baseUrl === null || baseUrl === "") {
    url = new URL(".", import.meta.url);
  } else {
    url = page ? new URL(String(baseUrl), page) : new URL(String(baseUrl));
  }
  url.search = "";
  url.hash = "";
  if (!url.pathname.endsWith("/")) url.pathname += "/";
  return url.href;
}

// One watch's I/O: the fetches, the stream reads and the timers its WatchLoop asks for, each
// outcome handed back to the loop; and the page's callbacks, never called after stop().
function watch(options) {
  const {
    jobId,
    path,
    recordPath,
    getToken = null,
    onEvent = null,
    onEnd = null,
    onState = null,
    onError = null,
    after = null,
    offlineAfter = OFFLINE_AFTER_MS,
    idleTimeout = IDLE_TIMEOUT_MS,
  } = options;
  const fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
  const base = resolveBaseUrl(options.baseUrl);
  const loop = new WatchLoop({ ends: jobId !== null, after, tokens: Boolean(getToken) });

  let stopped = false; // no callback runs once set: stop(), onEnd or a fatal onError
  let offlineTimer = null;
  let wake = null; // ends the current wait early (stop)
  let controller = null; // the current stream's

  const call = (callback, value) => {
    if (!callback || stopped) return;
    try {
      callback(value);
    } catch (error) {
      report(error); // the page's bug must not break the stream
    }
  };

  // An attempt got no answer, several times in a row: said while the watch goes on trying. A
  // page on an origin the server does not allow sees nothing else (the browser hides why).
  const unreachable = (cause) => {
    const error = unreachableError(base, cause);
    if (onError) call(onError, error);
    else console.warn("stepstream:", error.message);
  };

  // Carry out the loop's actions in order; returns the next step ("token", "connect",
  // "fetch-record" or "wait"), or null when there is none.
  const act = (actions) => {
    let step = null;
    for (const action of actions) {
      switch (action.type) {
        case "state":
          call(onState, action.state);
          break;
        case "deliver":
          call(onEvent, action.event);
          break;
        case "unreachable":
          unreachable(action.cause);
          break;
        case "fail":
          if (onError) call(onError, action.error);
          else report(action.error);
          stopped = true;
          break;
        case "end":
          call(onEnd, action.record);
          stopped = true;
          break;
        case "arm-offline":
          offlineTimer = setTimeout(() => act(loop.offline()), offlineAfter);
          break;
        case "disarm-offline":
          clearTimeout(offlineTimer);
          offlineTimer = null;
          break;
        case "abort":
          controller?.abort();
          break;
        case "cancel-wait":
          wake?.();
          break;
        default:
          step = action;
      }
    }
    return stopped ? null : step;
  };

  const url = (relative, params) => apiUrl(base, relative, params);

  const pause = (ms) =>
    new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      wake = () => {
        clearTimeout(timer);
        resolve();
      };
    }).finally(() => {
      wake = null;
    });

  // Reads frames into the loop until the stream ends, breaks, goes silent for `idleTimeout`
  // (the server sends a heartbeat at least every 15 s), or the loop is done with it.
  const read = async (response, signal) => {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser();
    let idle = null;
    const arm = () => {
      clearTimeout(idle);
      idle = setTimeout(() => controller?.abort(), idleTimeout);
    };
    arm();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (loop.state !== "open" || signal.aborted || done) return;
        arm();
        for (const frame of parser.push(decoder.decode(value, { stream: true }))) {
          act(loop.frame(frame));
          if (loop.state !== "open") return;
        }
      }
    } catch {
      // the connection broke, or the idle timer gave up on it: a drop
    } finally {
      clearTimeout(idle);
      reader.cancel().catch(() => {});
    }
  };

  const connect = async (params) => {
    controller = new AbortController();
    const { signal } = controller;
    let response;
    try {
      response = await fetchImpl(url(path, params), {
        headers: { Accept: "text/event-stream" },
        cache: "no-store",
        signal,
      });
    } catch (cause) {
      return act(loop.unanswered(cause));
    }
    if (stopped) {
      controller.abort();
      return null;
    }
    if (response.status === 204) return act(loop.terminal());
    if (!response.ok) return act(loop.refused(await refusal(response)));
    if (!isEventStream(response)) {
      await discard(response);
      return act(
        loop.fatal(
          new StepstreamError(
            `${url(path, {})} is not a Stepstream event stream ` +
              `(content-type ${response.headers.get("content-type")}); check baseUrl`,
            { status: response.status, code: "not_an_event_stream" },
          ),
        ),
      );
    }
    act(loop.opened(Date.now()));
    await read(response, signal);
    controller.abort();
    return act(loop.ended(Date.now()));
  };

  // The final record: GET /api/jobs/{id}, with the job's token.
  const fetchRecord = async (params) => {
    let response;
    try {
      response = await fetchImpl(url(recordPath, params), {
        headers: { Accept: "application/json" },
        cache: "no-store",
      });
    } catch (cause) {
      return act(loop.unanswered(cause));
    }
    if (stopped) return null;
    if (!response.ok) return act(loop.refused(await refusal(response)));
    let record;
    try {
      record = await response.json();
    } catch (cause) {
      return act(loop.fatal(new StepstreamError(`${recordPath}: the answer is not JSON`, { cause })));
    }
    return act(loop.record(record));
  };

  const token = async (reason) => {
    let value;
    try {
      value = await getToken({ jobId, reason });
    } catch (error) {
      if (stopped) return null;
      console.warn("stepstream: getToken failed; trying again", error);
      return act(loop.tokenFailed());
    }
    return act(loop.tokenArrived(value));
  };

  const steps = {
    token: (step) => token(step.reason),
    connect: (step) => connect(step.params),
    "fetch-record": (step) => fetchRecord(step.params),
    wait: async (step) => {
      await pause(step.ms);
      return act(loop.retry());
    },
  };

  const run = async () => {
    let step = act(loop.start());
    while (step) step = await steps[step.type](step);
  };

  // Started after this call returns, so a callback may already use the `stop` it returned.
  Promise.resolve()
    .then(run)
    .catch((error) => act(loop.fatal(error instanceof StepstreamError ? error : wrap(error))));

  return function stop() {
    if (stopped) return;
    stopped = true; // first: no callback runs from here on
    act(loop.close());
  };
}

// -- Human input ----------------------------------------------------------------------------

/**
 * Give the input `name` a waiting job asks for (its record's `waiting_for`, or the `waiting`
 * event): `value` must fit the request's JSON Schema. Resolves to the record (queued again);
 * rejects with a StepstreamError: 422 `invalid_value` (`details`: `{loc, msg}` per field), 409
 * `not_waiting`, `wrong_input` or `already_answered`, 403 for a token that may only read.
 *
 * `token`: a token minted by `POST /api/jobs/{id}/token` with `{"may_answer": true}` (a page
 * must never hold an API key); without one no credentials are sent (development).
 */
export async function answer(jobId, name, value, options = {}) {
  if (typeof jobId !== "string" || !jobId) throw new TypeError("answer needs a job id");
  const fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
  const path = `api/jobs/${encodeURIComponent(jobId)}/input`;
  const target = new URL(path, resolveBaseUrl(options.baseUrl));
  const headers = { "content-type": "application/json", accept: "application/json" };
  // In the header, never ?token=: the server refuses an answer's token in the URL.
  if (options.token) headers.authorization = `Bearer ${options.token}`;
  let response;
  try {
    response = await fetchImpl(target.href, {
      method: "POST",
      headers,
      body: JSON.stringify({ name, value }),
    });
  } catch (error) {
    throw wrap(error);
  }
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

function apiUrl(base, relative, params) {
  const target = new URL(relative, base);
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined) target.searchParams.set(key, value);
  }
  return target.href;
}

function unreachableError(base, cause) {
  const page = globalThis.location?.origin;
  const where = `${UNREACHABLE_AFTER} tries${page ? ` from ${page}` : ""} to ${base}; still trying`;
  return new StepstreamError(`${UNREACHABLE_HINT} (${where})`, {
    code: "unreachable",
    fatal: false,
    cause,
  });
}

// A non-2xx answer, as WatchLoop.refused takes it: a 429 or 5xx by its Retry-After, anything
// else by its error body.
async function refusal(response) {
  if (!retriable(response.status)) {
    return { status: response.status, error: await errorFrom(response) };
  }
  const retryAfterMs = parseRetryAfter(response.headers.get("retry-after"));
  await discard(response);
  return { status: response.status, retryAfterMs };
}

function isEventStream(response) {
  const type = response.headers.get("content-type") || "";
  return type.split(";")[0].trim().toLowerCase() === "text/event-stream";
}

async function discard(response) {
  try {
    await response.body?.cancel();
  } catch {
    // nothing to free
  }
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = body && typeof body === "object" ? body.error || {} : {};
  const message = error.message || `${response.url} answered ${response.status}`;
  return new StepstreamError(message, {
    status: response.status,
    code: error.code || `http_${response.status}`,
    details: error.details ?? null,
  });
}

function wrap(error) {
  return new StepstreamError(String(error?.message || error), { cause: error });
}

function report(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else console.error(error);
}
