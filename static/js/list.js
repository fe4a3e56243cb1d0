// The list of jobs, newest first. Rows are made once and updated in place (fixed height, so
// nothing jumps as events arrive; the bar's width moves by a CSS transition).

import { h, setText } from "./dom.js";
import { duration, relative, shortId } from "./format.js";
import {
  canCancel,
  canRetry,
  elapsedMs,
  inputLabel,
  messageLine,
  percent,
  stepLine,
  taskTitle,
  TERMINAL,
} from "./model.js";
import { createBar, updateBar } from "./bar.js";

export const STATE_LABELS = {
  scheduled: "Scheduled",
  queued: "Queued",
  running: "Running",
  retrying: "Retrying",
  waiting: "Waiting for input",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
};

export class JobList {
  constructor(listEl, { taskOf, onAction, emptyEl, countEl }) {
    this.listEl = listEl;
    this.emptyEl = emptyEl;
    this.countEl = countEl;
    this.taskOf = taskOf;
    this.onAction = onAction;
    this.rows = new Map();
  }

  has(id) {
    return this.rows.has(id);
  }

  /** Create or update a job's row. `fresh` rows are drawn at their current width, no animation. */
  upsert(record) {
    let row = this.rows.get(record.id);
    if (!row) {
      row = this._create(record);
      this.rows.set(record.id, row);
      this._insert(row, record);
    }
    row.record = record;
    this._update(row);
    this._updateEmpty();
  }

  _create(record) {
    const task = this.taskOf(record.task);
    const title = h("span", { class: "job-title" }, taskTitle(record.task, this.taskOf));
    const label = h("span", { class: "job-label" });
    const link = h(
      "a",
      { class: "job-link", href: `#/jobs/${encodeURIComponent(record.id)}` },
      title,
      label,
    );
    const badge = h("span", { class: "badge" });
    const attempt = h("span", { class: "job-attempt" });
    const elapsed = h("span", { class: "job-elapsed", title: "Elapsed time" });
    const action = h("button", {
      type: "button",
      class: "btn btn-small job-action",
      on: {
        click: (event) => {
          event.preventDefault();
          event.stopPropagation();
          const current = this.rows.get(record.id)?.record;
          if (current) this.onAction(action.dataset.action, current, action);
        },
      },
    });
    const bar = createBar(`Progress of ${taskTitle(record.task, this.taskOf)} ${shortId(record.id)}`);
    bar.el.dataset.jobId = record.id;
    const step = h("span", { class: "job-step" });
    const message = h("span", { class: "job-message" });
    const meta = h("span", { class: "job-id", title: record.id }, shortId(record.id));
    const el = h(
      "li",
      {
        class: "job",
        dataset: { jobId: record.id },
        // The whole row opens the job, wherever it is clicked (the bar and the lines above the
        // link's overlay too); the link stays the one keyboard and middle-click target.
        on: {
          click: (event) => {
            if (event.target.closest("a, button") || window.getSelection()?.toString()) return;
            link.click();
          },
        },
      },
      h("div", { class: "job-head" }, link, h("div", { class: "job-meta" }, attempt, badge)),
      h("div", { class: "job-barline" }, bar.el, h("span", { class: "job-pct" })),
      h("div", { class: "job-foot" }, step, message),
      h("div", { class: "job-side" }, meta, elapsed, action),
    );
    return { el, link, title, label, badge, attempt, elapsed, action, bar, step, message, pct: el.querySelector(".job-pct") };
  }

  _insert(row, record) {
    const key = record.created_at || "";
    let before = null;
    for (const other of this.listEl.children) {
      const otherRecord = this.rows.get(other.dataset.jobId)?.record;
      if (otherRecord && (otherRecord.created_at || "") < key) {
        before = other;
        break;
      }
    }
    this.listEl.insertBefore(row.el, before);
  }

  _update(row) {
    const record = row.record;
    const task = this.taskOf(record.task);
    const value = percent(record);
    row.el.dataset.state = record.state;
    setText(row.title, taskTitle(record.task, this.taskOf));
    setText(row.label, inputLabel(record));
    setText(row.badge, STATE_LABELS[record.state] || record.state);
    row.badge.dataset.state = record.state;
    setText(
      row.attempt,
      record.attempt > 1 ? `Attempt ${record.attempt}${record.max_attempts ? ` of ${record.max_attempts}` : ""}` : "",
    );
    updateBar(row.bar, value, record.state);
    setText(row.pct, `${value}%`);
    setText(row.step, stepLine(record, task));
    setText(row.message, messageLine(record));
    row.message.title = messageLine(record);
    this._tick(row);
    let action = "";
    if (canCancel(record)) action = "cancel";
    else if (canRetry(record)) action = "retry";
    // A pending "Cancelling…" stays until the job's state moves on.
    if (row.action.dataset.action !== action) {
      row.action.dataset.action = action;
      delete row.action.dataset.pending;
      row.action.disabled = false;
      setText(row.action, action === "cancel" ? "Cancel" : action === "retry" ? "Retry" : "");
      row.action.hidden = !action;
      row.action.setAttribute("aria-label", `${action === "cancel" ? "Cancel" : "Retry"} job ${shortId(record.id)}`);
    }
  }

  _tick(row, now = Date.now()) {
    const record = row.record;
    const ms = elapsedMs(record, now);
    let text = ms === null ? "" : duration(ms);
    if ((record.state === "queued" || record.state === "scheduled") && !record.started_at) {
      text = relative(record.created_at, now);
    }
    setText(row.elapsed, text);
    if (record.state === "retrying" || record.state === "scheduled") {
      setText(row.step, stepLine(record, this.taskOf(record.task), now));
    }
  }

  /** Every second: elapsed times of unfinished jobs, and retry countdowns. */
  tick() {
    const now = Date.now();
    for (const row of this.rows.values()) {
      if (!TERMINAL.has(row.record.state)) this._tick(row, now);
    }
  }

  remove(id) {
    const row = this.rows.get(id);
    if (!row) return;
    row.el.remove();
    this.rows.delete(id);
    this._updateEmpty();
  }

  _updateEmpty() {
    this.emptyEl.hidden = this.rows.size > 0;
    const counts = {};
    for (const row of this.rows.values()) counts[row.record.state] = (counts[row.record.state] || 0) + 1;
    const active = (counts.running || 0) + (counts.queued || 0) + (counts.retrying || 0);
    setText(this.countEl, this.rows.size ? `${this.rows.size} shown · ${active} active` : "");
  }

  showEmpty() {
    this._updateEmpty();
  }
}
