// The job record as the browser keeps it: the server's record (GET /api/jobs) plus the events
// that followed it. The fold itself (applyEvent) lives in the browser client, stepstream.js,
// which pages use for `onRecord`; the dashboard folds with the same code.

import { compareIds as streamIdOrder } from "../../stepstream.js";

export { applyEvent, emptyProjection } from "../../stepstream.js";
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
