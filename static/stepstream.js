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
// parseRetryAfter, compareIds, StepTexts, applyOutput, applyEvent, RecordFold): Node's test
// runner drives them directly (tests/js/).

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
  const follower = new Follower({ ends: jobId !== null, after });
  const backoff = new Backoff();

  let stopped = false;
  let state = null;
  let offlineTimer = null;
  let wake = null; // ends the current pause early (stop)
  let controller = null;
  let token = null;
  let tokenNeeded = Boolean(getToken);
  let tokenReason = "connect";
  let tokenFresh = false; // fetched for this attempt, never yet accepted by the server
  let freshRanOut = 0; // fresh tokens refused as expired since a stream last opened
  let noAnswers = 0; // attempts in a row that got no HTTP answer (network error, CORS)

  const call = (callback, value) => {
    if (!callback || stopped) return;
    try {
      callback(value);
    } catch (error) {
      report(error); // the page's bug must not break the stream
    }
  };

  const setState = (next) => {
    if (next === "live" || next === "closed") {
      clearTimeout(offlineTimer);
      offlineTimer = null;
    }
    if (next === state) return;
    state = next;
    call(onState, next);
  };

  // Something went wrong; the watch goes on trying. After `offlineAfter` ms without a working
  // stream the state reads "offline" (the stream says so, not navigator.onLine).
  const down = () => {
    setState(state === "live" ? "reconnecting" : state === "offline" ? "offline" : state);
    offlineTimer ??= setTimeout(() => {
      if (!stopped && state !== "live" && state !== "closed") setState("offline");
    }, offlineAfter);
  };

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

  const fail = (error) => {
    if (stopped) return;
    setState("closed");
    if (onError) call(onError, error);
    else report(error);
    stopped = true;
  };

  // An attempt got no answer. Once per run of them, said while the watch goes on trying: a
  // page on an origin the server does not allow sees nothing else (the browser hides why).
  const noAnswer = (cause) => {
    noAnswers += 1;
    if (noAnswers !== UNREACHABLE_AFTER) return;
    const page = globalThis.location?.origin;
    const where = `${UNREACHABLE_AFTER} tries${page ? ` from ${page}` : ""} to ${base}; still trying`;
    const error = new StepstreamError(`${UNREACHABLE_HINT} (${where})`, {
      code: "unreachable",
      fatal: false,
      cause,
    });
    if (onError) call(onError, error);
    else console.warn("stepstream:", error.message);
  };

  const url = (relative, params) => {
    const target = new URL(relative, base);
    for (const [key, value] of Object.entries(params)) {
      if (value !== null && value !== undefined) target.searchParams.set(key, value);
    }
    return target.href;
  };

  // A token when one is needed: first connect, `token_expired`, a 401. False: stopped, or
  // the token could not be had (backed off already).
  const ensureToken = async () => {
    if (!tokenNeeded) return true;
    try {
      const value = await getToken({ jobId, reason: tokenReason });
      if (stopped) return false;
      token = value === null || value === undefined || value === "" ? null : String(value);
      tokenNeeded = false;
      tokenFresh = true;
      return true;
    } catch (error) {
      if (stopped) return false;
      // The page's token endpoint may be down for a moment, like the server itself.
      console.warn("stepstream: getToken failed; trying again", error);
      down();
      await pause(backoff.failed({ retryMs: follower.retryMs }));
      return false;
    }
  };

  // What to do with a non-2xx answer: "renew", a delay in ms, or a StepstreamError.
  const judge = async (response) => {
    if (response.status === 401 && getToken) {
      const refusal = await errorFrom(response);
      // A kept token is renewed on any 401. A fresh one is renewed only if it ran out: it can
      // wait out its life while the server is away (a restart), but any other refusal would
      // come back for the next token too.
      const ranOut = tokenFresh && refusal.code === "token_expired";
      if (tokenFresh && !ranOut) return refusal;
      tokenNeeded = true;
      tokenReason = ranOut ? "expired" : "unauthorized";
      // Fresh tokens that keep arriving expired (a clock or TTL problem): back off, no spin.
      if (ranOut && freshRanOut++ > 0) return backoff.failed({ retryMs: follower.retryMs });
      return "renew";
    }
    if (response.status === 429 || response.status >= 500) {
      const retryAfterMs = parseRetryAfter(response.headers.get("retry-after"));
      await discard(response);
      return backoff.failed({ retryMs: follower.retryMs, retryAfterMs });
    }
    return errorFrom(response);
  };

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
        if (stopped || signal.aborted) return "dropped";
        if (done) return "dropped";
        arm();
        for (const frame of parser.push(decoder.decode(value, { stream: true }))) {
          const { event, renew } = follower.accept(frame);
          if (event) call(onEvent, event);
          if (stopped) return "dropped";
          if (renew) return "renew";
          if (follower.finished) return "finished";
        }
      }
    } catch {
      return "dropped"; // the connection broke, or the idle timer gave up on it
    } finally {
      clearTimeout(idle);
      reader.cancel().catch(() => {});
    }
  };

  // The final record: from a terminal snapshot, or GET /api/jobs/{id} (with the job's token).
  const finalRecord = async () => {
    if (follower.finalRecord) return follower.finalRecord;
    for (;;) {
      if (!(await ensureToken())) {
        if (stopped) return null;
        continue;
      }
      let response;
      try {
        response = await fetchImpl(url(recordPath, { token }), {
          headers: { Accept: "application/json" },
          cache: "no-store",
        });
      } catch (cause) {
        if (stopped) return null;
        down();
        noAnswer(cause);
        await pause(backoff.failed({ retryMs: follower.retryMs }));
        continue;
      }
      if (stopped) return null;
      noAnswers = 0;
      if (response.ok) {
        try {
          return await response.json();
        } catch (cause) {
          fail(new StepstreamError(`${recordPath}: the answer is not JSON`, { cause }));
          return null;
        }
      }
      const verdict = await judge(response);
      if (verdict instanceof StepstreamError) {
        fail(verdict);
        return null;
      }
      if (verdict !== "renew") {
        down();
        await pause(verdict);
      }
    }
  };

  const run = async () => {
    setState("connecting");
    while (!stopped) {
      if (!(await ensureToken())) continue;
      const params = { after: follower.cursor, token };
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
        if (stopped) return;
        down();
        noAnswer(cause);
        await pause(backoff.failed({ retryMs: follower.retryMs }));
        continue;
      }
      if (stopped) {
        controller.abort();
        return;
      }
      noAnswers = 0;
      if (response.status === 204) {
        follower.noContent(); // the cursor is the terminal event: the job is over
      } else if (!response.ok) {
        const verdict = await judge(response);
        if (verdict instanceof StepstreamError) return fail(verdict);
        if (verdict !== "renew") {
          down();
          await pause(verdict);
        }
        continue;
      } else if (!isEventStream(response)) {
        await discard(response);
        return fail(
          new StepstreamError(
            `${url(path, {})} is not a Stepstream event stream ` +
              `(content-type ${response.headers.get("content-type")}); check baseUrl`,
            { status: response.status, code: "not_an_event_stream" },
          ),
        );
      } else {
        tokenFresh = false;
        freshRanOut = 0;
        backoff.opened(Date.now());
        follower.connectionOpened();
        setState("live");
        const outcome = await read(response, signal);
        controller.abort();
        if (stopped) return;
        if (outcome === "renew") {
          tokenNeeded = Boolean(getToken);
          tokenReason = "expired";
          // A planned reconnect, at once; the same back-off as a drop if it comes too often.
          const lasted = Date.now() - backoff.openedAt;
          if (follower.delivered === 0 && lasted < 1000) {
            down();
            await pause(backoff.failed({ retryMs: follower.retryMs }));
          }
          continue;
        }
        if (outcome === "dropped") {
          const delay = backoff.dropped({
            delivered: follower.delivered,
            retryMs: follower.retryMs,
            now: Date.now(),
          });
          down();
          if (delay) await pause(delay);
          continue;
        }
      }
      // The job's stream is over (its terminal event, a terminal snapshot, or a 204).
      const record = await finalRecord();
      if (stopped || record === null) return;
      setState("closed");
      call(onEnd, record);
      stopped = true;
      return;
    }
  };

  // Started after this call returns, so a callback may already use the `stop` it returned.
  Promise.resolve()
    .then(run)
    .catch((error) => fail(error instanceof StepstreamError ? error : wrap(error)));

  return function stop() {
    if (stopped) return;
    stopped = true;
    clearTimeout(offlineTimer);
    controller?.abort();
    wake?.();
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
