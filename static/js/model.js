// The job record as the browser keeps it: the server's record (GET /api/jobs) plus the events
// that followed it, applied the same way the worker projects them (docs/protocol.md, "Events").

import { applyOutput, compareIds as streamIdOrder } from "../../stepstream.js";
import { duration, parseTime } from "./format.js";

export const TERMINAL = new Set(["completed", "failed", "cancelled"]);
/** Order of two event ids; a missing id sorts first (a record with no event yet). */
export function compareIds(a, b) {
  if (!a || !b) return a ? 1 : b ? -1 : 0;
  return streamIdOrder(a, b) ?? 0;
}

export function clone(value) {
  return value === undefined ? undefined : structuredClone(value);
}

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

/** Apply one stored event to a record (mutates it). `eventId` is the event's id in its job's log. */
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
      // The run ended in wait_for_input: no worker holds the job until the input is given.
      const { type, job_id, at: _, attempt, ...request } = event;
      record.state = "waiting";
      record.waiting_for = request;
      record.attempt = Math.max(0, attempt - 1); // a wait costs no attempt
      record.message = request.prompt || `Waiting for input ${request.name}`;
      interruptRunningStep(record, "waiting", at);
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

// -- What a person reads ------------------------------------------------------------------

export function percent(record) {
  const value = record.state === "completed" ? 1 : Number(record.progress) || 0;
  return Math.round(clamp(value, 0, 1) * 100);
}

export function stepCount(record, task) {
  return record.step?.count || task?.steps?.length || record.steps?.length || 0;
}

/** "Step 3 of 7 · Chunking document", or what the job is doing instead. */
export function stepLine(record, task, now = Date.now()) {
  const count = stepCount(record, task);
  const ref = record.step;
  switch (record.state) {
    case "scheduled": {
      const at = parseTime(record.run_at);
      if (at === null) return "Scheduled";
      const when = new Date(at).toLocaleTimeString();
      return at > now ? `Scheduled for ${when} (in ${duration(at - now)})` : `Scheduled for ${when}`;
    }
    case "queued":
      return record.attempt > 0 ? "Queued to run again" : "Waiting in the queue";
    case "waiting":
      return `Waiting for input · ${record.waiting_for?.name ?? ""}`;
    case "running":
      if (record.batch) return `${record.batch.done ?? 0} of ${record.batch.size} items done`;
      return ref ? `Step ${ref.index} of ${ref.count} · ${ref.name}` : "Starting…";
    case "retrying": {
      const at = parseTime(record.retry_at);
      const wait = at === null ? "" : ` in ${duration(Math.max(0, at - now))}`;
      const failedStep = failedStepRef(record, task);
      const where = failedStep
        ? ` · failed ${failedStep.after ? "after" : "at"} step ${failedStep.index} of ${count || "?"}`
        : "";
      return `Retrying${wait}${where}`;
    }
    case "completed":
      if (record.cached) return "Completed from the result cache";
      if (record.batch) return `Completed all ${record.batch.size} items`;
      if (count === 1) return "Completed its one step";
      return count ? `Completed all ${count} steps` : "Completed";
    case "failed": {
      const failedStep = failedStepRef(record, task);
      return failedStep
        ? `Failed ${failedStep.after ? "after" : "at"} step ${failedStep.index} of ${count || "?"} · ${failedStep.name}`
        : "Failed";
    }
    case "cancelled":
      return ref ? `Cancelled at step ${ref.index} of ${ref.count} · ${ref.name}` : "Cancelled";
    default:
      return record.state;
  }
}

/**
 * The step a failure belongs to: {index, name, after}. `after` is true when that step itself
 * had completed (the failure came between it and the next step), so we say "after step 3".
 */
export function failedStepRef(record, task) {
  const name = record.error?.step;
  if (name) {
    const known = task?.steps?.indexOf(name) ?? -1;
    const fromSteps = (record.steps || []).find((s) => s.name === name);
    const index = known >= 0 ? known + 1 : fromSteps?.index;
    const after = fromSteps ? ["completed", "restored"].includes(fromSteps.state) : false;
    return { index: index ?? "?", name, after };
  }
  return record.step ? { ...record.step, after: false } : null;
}

/** The live line under the bar. */
export const BATCH_PREFIX = "batch:";

/** A task's title for people; a batch parent is named after its items' task. */
export function taskTitle(name, taskOf) {
  if (name?.startsWith(BATCH_PREFIX)) {
    const inner = name.slice(BATCH_PREFIX.length);
    return `Batch · ${taskOf(inner)?.title || inner}`;
  }
  return taskOf(name)?.title || name;
}

export function messageLine(record) {
  if (record.state === "failed" || record.state === "retrying") {
    return record.error?.message || record.message || "";
  }
  if (record.state === "cancelled") return record.cancel_reason || "Cancelled by request";
  if (record.state === "completed") return record.batch ? record.message || "" : "";
  return record.message || "";
}

/** Elapsed time of the job: running jobs tick, finished ones stay fixed. */
export function elapsedMs(record, now = Date.now()) {
  const start = parseTime(record.started_at) ?? parseTime(record.created_at);
  if (start === null) return null;
  const end = TERMINAL.has(record.state) ? parseTime(record.finished_at) ?? now : now;
  return Math.max(0, end - start);
}

export function canCancel(record) {
  return ["scheduled", "queued", "running", "retrying", "waiting"].includes(record.state);
}

export function canRetry(record) {
  return record.state === "failed" || record.state === "cancelled";
}

/** A short label from the input, so jobs of one task can be told apart. */
export function inputLabel(record) {
  if (record.batch) return `${record.batch.size} ${record.batch.size === 1 ? "item" : "items"}`;
  const input = record.input || {};
  for (const key of ["title", "name", "client", "label", "query", "text"]) {
    if (typeof input[key] === "string" && input[key].trim()) return input[key].trim();
  }
  for (const value of Object.values(input)) {
    if (typeof value === "string" && value.trim()) return value.trim();
  }
  return "";
}
