// Types for stepstream.js, Stepstream's browser client.

/** The state of a watch, for a status badge. "closed": the watch is over (ended or failed). */
export type ConnectionState = "connecting" | "live" | "reconnecting" | "offline" | "closed";

export type JobState =
  | "scheduled"
  | "queued"
  | "running"
  | "retrying"
  /** Waits for a person's input (`waiting_for`); holds no worker. `answer()` resumes it. */
  | "waiting"
  | "completed"
  | "failed"
  | "cancelled";

export interface StepRef {
  index: number;
  count: number;
  name: string;
}

export interface JobError {
  type: string;
  message: string;
  step?: string | null;
  retryable?: boolean;
  [field: string]: unknown;
}

/** What a waiting job asks for: the record's `waiting_for`, and the `waiting` event's data. */
export interface InputRequest {
  name: string;
  prompt: string | null;
  /** The JSON Schema the value must fit. */
  schema: Record<string, unknown>;
  /** Then the default applies, or the job fails with InputTimeout. */
  timeout_at: string | null;
  default: unknown;
}

/** An input given to a job: who gave it ("owner:<o>", "subject:<s>", "token", "anonymous",
 * "default") and when. */
export interface InputAnswer {
  value: unknown;
  by: string;
  at: string;
}

/** The job record, as `GET /api/jobs/{id}` returns it. */
export interface JobRecord {
  id: string;
  task: string;
  state: JobState;
  input: unknown;
  step: StepRef | null;
  progress: number | null;
  message: string | null;
  steps: Array<{
    index: number;
    name: string;
    state: string;
    started_at?: string | null;
    finished_at?: string | null;
    duration_ms?: number | null;
    output?: unknown;
    /** run_step's stored return value, when its `output` shows something else. */
    value?: unknown;
    /** The text the step wrote so far (`output` events); null when it wrote none. */
    text?: string | null;
  }>;
  attempt: number;
  max_attempts: number;
  error: JobError | null;
  result?: unknown;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  last_event_id: string | null;
  /** Set while the job is `waiting`: the input it asks for, or `{children}` (their counts). */
  waiting_for?: InputRequest | { children: ChildCounts } | null;
  /** A child job (ctx.map / ctx.spawn): its parent's id, its index and its depth. */
  parent?: string | null;
  parent_index?: number | null;
  depth?: number;
  /** A parent: its children's counts (read while it waits: also running, running_progress). */
  children?: ChildCounts | null;
  /** The inputs given so far, by name. */
  answers?: Record<string, InputAnswer>;
  [field: string]: unknown;
}

/** A parent's children: every child it started, by outcome. */
export interface ChildCounts {
  size: number;
  done: number;
  completed: number;
  failed: number;
  cancelled: number;
  [field: string]: unknown;
}

/**
 * One event. `type` is a stored event type ("queued", "started", "step", "progress",
 * "step_completed", "log", "output", "retrying", "waiting" (data: InputRequest, or
 * `{children}` for a parent waiting for its child jobs), "input" (data: name, value, by),
 * "child" (on a parent: `child: {id, index, task, state}`, and at a child's end `counts`,
 * `message`, `progress`), "completed", "failed", "cancelled") or one the server
 * makes: "snapshot" (`data` is the whole JobRecord) and "reset" (`id` is null).
 * On the firehose `id` is the firehose id and `data.event_id` the event's id in its job's log.
 */
export interface StepstreamEvent<T = any> {
  id: string | null;
  type: string;
  data: T;
}

/** Why `getToken` is called: the first connect, a `token_expired` event, or a 401. */
export interface TokenRequest {
  /** The job being watched; null for `watchAll` (the firehose). */
  jobId: string | null;
  reason: "connect" | "expired" | "unauthorized";
}

export interface WatchOptions {
  /**
   * Where the Stepstream API lives, e.g. "https://progress.example.com" or
   * "https://app.example.com/progress". Default: the directory this module was loaded from.
   */
  baseUrl?: string | URL;
  /**
   * A stream token (`POST /api/jobs/{id}/token`, `POST /api/events/token`), awaited whenever one
   * is needed: first connect, `token_expired`, a 401. Return null for no token (development).
   * Without `getToken` no token is sent.
   */
  getToken?: (request: TokenRequest) => string | null | undefined | Promise<string | null | undefined>;
  /** Each stored event exactly once, in log order, across reconnects and token renewals. */
  onEvent?: (event: StepstreamEvent) => void;
  onState?: (state: ConnectionState) => void;
  /**
   * `error.fatal` true: the watch cannot go on and is over (404, 400, a 401 with a fresh token,
   * not an event stream). `error.fatal` false: a report while the watch goes on trying; today
   * only `code` "unreachable": no answer at all `UNREACHABLE_AFTER` (3) times in a row (a network
   * error, or this page's origin is not in STEPSTREAM_CORS_ORIGINS: the browser hides which),
   * said once per run of failures. Without `onError`, a fatal error goes to `reportError` and a
   * non-fatal one to `console.warn`.
   */
  onError?: (error: StepstreamError) => void;
  /**
   * Start after this event id; "0" for the whole stored log. Default: a job's stream starts with
   * a `snapshot` of the record, the firehose with what happens from now on.
   */
  after?: string | null;
  /** After this many milliseconds without a working stream the state reads "offline" (15000). */
  offlineAfter?: number;
  /** A stream silent this long (ms; heartbeats count) is dropped and resumed (45000). */
  idleTimeout?: number;
  /** The fetch to use (default: globalThis.fetch). */
  fetch?: typeof fetch;
}

/** The `data` of an `output` event: a delta of a step's text. */
export interface OutputEventData {
  job_id: string;
  type: "output";
  at: string;
  attempt: number;
  step: { index: number; count: number; name: string };
  /** The delta. */
  text: string;
  /** Characters (Unicode code points, not UTF-16 units) of the step's text before the delta. */
  offset: number;
}

/** A step's text changed: a delta arrived, or the step started over (`restarted`). */
export interface StepTextChange {
  index: number;
  name: string;
  /** The step's whole text now. */
  text: string;
  delta: string;
  attempt: number;
  /** The text was cleared first: the step runs again (a retry, a crash takeover). */
  restarted: boolean;
}

export interface WatchJobOptions extends WatchOptions {
  /**
   * The job as it is now, for a page to show whatever its state (running, finished, not started
   * yet): after the snapshot, after every event (folded into the record by the client: state,
   * step, progress, message, `steps[i].text`, a batch's `batch` counts), and last with the
   * record `onEnd` gets. Each call gets a copy of its own. From `after: "0"` it is folded from
   * the `queued` event; from `after: "<id>"` it starts with the next `snapshot`.
   */
  onRecord?: (record: JobRecord) => void;
  /** Called once, with the final record, after the job's terminal event. */
  onEnd?: (record: JobRecord) => void;
  /** Each change of a step's streamed text, after `onEvent` for the event that made it. */
  onText?: (change: StepTextChange) => void;
}

/** Stops the watch: no callback is called after it returns. */
export type Stop = () => void;

export interface JobWatch extends Stop {
  /** The text of step `index` (1-based) so far, as the snapshot and `output` events built it. */
  text(index: number): string;
}

export function watchJob(jobId: string, options?: WatchJobOptions): JobWatch;

export interface AnswerOptions {
  baseUrl?: string | URL;
  /** A token minted by `POST /api/jobs/{id}/token` with `{"may_answer": true}`; sent as `Authorization: Bearer`. */
  token?: string | null;
  fetch?: typeof fetch;
}

/**
 * Give the input a waiting job asks for. Resolves to the record (queued again); rejects with a
 * StepstreamError (422 `invalid_value`, 409 `not_waiting` / `wrong_input` /
 * `already_answered`, 403 a token that may only read, 404).
 */
export function answer(
  jobId: string,
  name: string,
  value: unknown,
  options?: AnswerOptions,
): Promise<JobRecord>;

export function watchAll(options?: WatchOptions): Stop;

export class StepstreamError extends Error {
  constructor(
    message: string,
    init?: { status?: number; code?: string; details?: unknown; fatal?: boolean; cause?: unknown },
  );
  /** The HTTP status (0 when there was no answer). */
  status: number;
  /**
   * The server's error code, e.g. "job_not_found", "unauthorized", "token_expired"; or the
   * client's: "unreachable" (not fatal), "not_an_event_stream".
   */
  code: string;
  details: unknown;
  /** True (the default): the watch is over. False: the watch goes on trying (see `onError`). */
  fatal: boolean;
}

/** Attempts in a row with no answer before the non-fatal "unreachable" error (3). */
export const UNREACHABLE_AFTER: number;
/** The start of the "unreachable" error's message. */
export const UNREACHABLE_HINT: string;

/** The API base URL (ending in "/") that `baseUrl` resolves to. */
export function resolveBaseUrl(baseUrl?: string | URL | null): string;

// The pure parts, exported for tests and for other transports.

export interface SseFrame {
  event: string;
  data: string;
  id: string | null;
  retry: number | null;
}

export class SseParser {
  push(chunk: string): SseFrame[];
}

export class Follower {
  constructor(init: { ends: boolean; after?: string | null });
  cursor: string | null;
  retryMs: number;
  finished: boolean;
  finalRecord: JobRecord | null;
  delivered: number;
  connectionOpened(): void;
  noContent(): void;
  accept(frame: SseFrame): { event: StepstreamEvent | null; renew: boolean };
}

export class Backoff {
  constructor(init?: { initialMs?: number; maxMs?: number; random?: () => number });
  failures: number;
  opened(now: number): void;
  dropped(init: { delivered: number; retryMs: number; now: number }): number;
  failed(init?: { retryMs?: number; retryAfterMs?: number | null }): number;
}

/** A step's text after one `output` event (`data`): its first `offset` characters, then the delta. */
export function applyOutput(text: string | null | undefined, data: Pick<OutputEventData, "text" | "offset">): string;

export class StepTexts {
  steps: Map<number, { index: number; name: string; text: string; attempt: number }>;
  text(index: number): string;
  apply(event: StepstreamEvent): StepTextChange | null;
}

/** Apply one stored event (its `data`) to a record, as the worker does; mutates and returns it. */
export function applyEvent(record: JobRecord, data: Record<string, any>, eventId?: string | null): JobRecord;
/** A record with nothing happened yet, for a log replayed from its start. */
export function emptyProjection(record: Partial<JobRecord>): JobRecord;

/** One job's record from its stream, as `onRecord` gets it. */
export class RecordFold {
  constructor(jobId?: string | null);
  record: JobRecord | null;
  /** The record after `event`, or null (a `reset`, or nothing to fold it into yet). */
  apply(event: StepstreamEvent): JobRecord | null;
}

export function parseRetryAfter(value: string | null | undefined, now?: number): number | null;
export function compareIds(a: string, b: string): -1 | 0 | 1 | null;
