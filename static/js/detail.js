// One job in detail: step timeline, log, result (readable and raw), error, actions.
//
// It reads the job's whole log once (`after: "0"`, one stream of stepstream.js), then follows
// it live; the watch ends at the terminal event. Until the replay reaches the record fetched on
// open, the record is shown, so the view never runs backwards while catching up.

import { h, clear, fill, setText } from "./dom.js";
import { clockTime, dateTime, duration, number, parseTime, shortId } from "./format.js";
import { watchJob } from "../../stepstream.js";
import { createBar, updateBar } from "./bar.js";
import {
  applyEvent,
  canCancel,
  canRetry,
  clone,
  compareIds,
  elapsedMs,
  emptyProjection,
  failedStepRef,
  inputLabel,
  messageLine,
  percent,
  stepLine,
  taskTitle,
  TERMINAL,
} from "./model.js";
import { inlineValue, rawJson, renderValue } from "./value.js";
import { STATE_LABELS } from "./list.js";
import { api, streamToken } from "./api.js";
import { InputSection } from "./input.js";

const STEP_STATE_LABELS = {
  pending: "Pending",
  running: "Running",
  completed: "Done",
  restored: "Restored",
  failed: "Failed",
  cancelled: "Cancelled",
  waiting: "Waiting",
};

const CHILD_ROWS = 200; // a parent's children listed in its detail

export class DetailView {
  constructor({ panel, body, backdrop, taskOf, onAction, onClose, onStatus }) {
    this.panel = panel;
    this.body = body;
    this.backdrop = backdrop;
    this.taskOf = taskOf;
    this.onAction = onAction;
    this.onClose = onClose;
    this.onStatus = onStatus;
    this.job = null; // {id, base, proj, caughtUp, ended, stop, state, lastId, ...}
    this.renderQueued = false;
    backdrop.addEventListener("click", () => this.onClose());
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && this.job) this.onClose();
    });
  }

  get openId() {
    return this.job?.id ?? null;
  }

  /** The open job's stream state ("connecting", "live", ...); null when there is none. */
  get streamStatus() {
    const job = this.job;
    if (!job?.stop || job.ended || job.state === "closed") return null;
    return job.state;
  }

  async open(id, cached) {
    if (this.job?.id === id) return;
    this.close(false);
    const job = {
      id,
      base: cached ? clone(cached) : null,
      proj: null,
      caughtUp: false,
      ended: false,
      stop: null,
      state: null,
      lastId: null,
      renderedResult: undefined,
      renderedError: undefined,
      logCount: 0,
      children: new Map(), // a parent's children, by id, from its `child` events
      childrenKey: null,
    };
    this.job = job;
    this._skeleton();
    this.panel.hidden = false;
    this.backdrop.hidden = false;
    document.body.classList.add("detail-open");
    if (job.base) this.render();
    this.els.title.focus({ preventScroll: true });
    this._loadChildren(job);
    // A server that cannot be reached (a restart) or answers 5xx is asked again, with the
    // list's copy of the record shown meanwhile; only an answer about the job itself (404,
    // 401, 403) is final.
    for (let wait = 500; ; wait = Math.min(wait * 2, 5000)) {
      try {
        const { data } = await api(`api/jobs/${encodeURIComponent(id)}`);
        if (this.job !== job) return;
        if (this.showingMessage) this._skeleton(); // a failed try's message was shown
        job.base = data;
        this.render();
        this._stream(null);
        return;
      } catch (error) {
        if (this.job !== job) return;
        const transient = !error.status || error.status >= 500;
        if (!transient || !job.base) this._notFound(error);
        if (!transient) return;
        await new Promise((resolve) => setTimeout(resolve, wait));
        if (this.job !== job) return;
      }
    }
  }

  /** A parent's children as the API lists them: the rows its stream then keeps live (its
   * log has them all too, unless its oldest events were trimmed away). */
  async _loadChildren(job) {
    try {
      const { data } = await api(`api/jobs?parent=${encodeURIComponent(job.id)}&limit=200`);
      if (this.job !== job) return;
      for (const child of data.jobs) {
        const known = job.children.get(child.id) || {};
        job.children.set(child.id, { id: child.id, index: child.parent_index, task: child.task, state: child.state, ...known });
      }
      if (data.jobs.length) this.scheduleRender();
    } catch {
      // the stream's `child` events still fill the list
    }
  }

  close(notify = true) {
    if (!this.job) return;
    this.job.stop?.();
    this.job = null;
    this.panel.hidden = true;
    this.backdrop.hidden = true;
    document.body.classList.remove("detail-open");
    if (notify) this.onStatus();
  }

  /** The firehose saw an event of this job: if our stream already ended (a retry), follow again. */
  noticeEvent(jobId, eventId) {
    const job = this.job;
    if (!job || job.id !== jobId || !job.ended) return;
    if (compareIds(eventId, job.lastId) > 0) this._stream(job.lastId);
  }

  /** After Retry from here: the job's log continues after its terminal event. */
  follow() {
    if (this.job?.ended) this._stream(this.job.lastId);
  }

  _stream(after) {
    const job = this.job;
    job.stop?.();
    job.ended = false;
    job.state = "connecting";
    const settle = () => {
      job.ended = true;
      this.onStatus();
    };
    job.stop = watchJob(job.id, {
      after: after || "0",
      getToken: streamToken(`api/jobs/${encodeURIComponent(job.id)}/token`),
      onEvent: ({ id, type, data }) => this._onEvent(job, type, data, id),
      onState: (state) => {
        job.state = state;
        this.onStatus();
      },
      onEnd: settle,
      // A job that expired meanwhile: the record shown is the last known. A non-fatal error
      // (no answer for a while) leaves the watch trying; the badge says so.
      onError: (error) => error.fatal && settle(),
    });
  }

  _onEvent(job, type, data, id) {
    if (this.job !== job) return;
    if (type === "reset") return; // a snapshot follows
    if (type === "child" && data.child?.id) {
      // A parent's children, live: its log has each one's start and end.
      const known = job.children.get(data.child.id) || {};
      const ended = known.state && known.state !== "running" && data.child.state === "running";
      if (!ended) job.children.set(data.child.id, { ...known, ...data.child });
    }
    if (type === "snapshot") {
      job.proj = data;
      job.caughtUp = true;
      job.lastId = data.last_event_id || id;
    } else {
      if (!job.proj) {
        // The whole log from its start, unless its oldest entries were trimmed away.
        job.proj = type === "queued" ? emptyProjection(job.base) : clone(job.base);
        if (type !== "queued" && compareIds(id, job.base.last_event_id) <= 0) {
          job.lastId = id;
          return;
        }
      }
      applyEvent(job.proj, data, id);
      job.lastId = id;
      this._log(type, data);
      if (!job.caughtUp && compareIds(id, job.base.last_event_id) >= 0) job.caughtUp = true;
    }
    if (TERMINAL.has(job.proj?.state) && (TERMINAL.has(type) || type === "snapshot")) {
      // The watch ends here (it fetches the final record); a retry from now on is followed
      // with a new watch from this event.
      job.ended = true;
      this.onStatus();
    }
    this.scheduleRender();
  }

  get record() {
    const job = this.job;
    if (!job) return null;
    return job.caughtUp && job.proj ? job.proj : job.base;
  }

  scheduleRender() {
    if (this.renderQueued) return;
    this.renderQueued = true;
    const run = () => {
      if (!this.renderQueued) return;
      this.renderQueued = false;
      this.render();
    };
    requestAnimationFrame(run);
    setTimeout(run, 100); // rAF does not run in a hidden tab
  }

  _skeleton() {
    this.showingMessage = false;
    const title = h("h2", { id: "detail-title", class: "detail-title", tabindex: "-1" }, "Job");
    const close = h(
      "button",
      { type: "button", class: "btn btn-ghost detail-close", "aria-label": "Close job details", on: { click: () => this.onClose() } },
      "✕",
    );
    const badge = h("span", { class: "badge" });
    const action = h("button", {
      type: "button",
      class: "btn btn-secondary detail-action",
      hidden: true,
      on: {
        click: () => {
          const record = this.record;
          if (record) this.onAction(action.dataset.action, record, action);
        },
      },
    });
    const bar = createBar("Job progress");
    const els = {
      title,
      subtitle: h("p", { class: "detail-sub" }),
      badge,
      action,
      bar,
      pct: h("span", { class: "job-pct" }),
      stepLine: h("p", { class: "detail-step" }),
      message: h("p", { class: "detail-message" }),
      facts: h("dl", { class: "facts" }),
      error: h("section", { class: "detail-section error-box", hidden: true, "aria-labelledby": "error-title" }),
      steps: h("ol", { class: "timeline" }),
      result: h("section", { class: "detail-section", hidden: true, "aria-labelledby": "result-title" }),
      log: h("ol", { class: "log", hidden: true }),
      logEmpty: h("p", { class: "muted log-empty" }, "Nothing logged yet."),
      input: h("pre", { class: "raw" }),
      asked: h("section", { class: "detail-section input-box", hidden: true, "aria-labelledby": "input-title" }),
      children: h("ol", { class: "children" }),
    };
    this.els = els;
    const jobId = this.job.id;
    this.asked = new InputSection(els.asked, async (name, value) => {
      const path = `api/jobs/${encodeURIComponent(jobId)}/input`;
      await api(path, { method: "POST", body: { name, value } });
    });
    fill(
      this.body,
      h(
        "header",
        { class: "detail-head" },
        h("div", { class: "detail-heading" }, title, els.subtitle),
        close,
      ),
      h(
        "div",
        { class: "detail-status" },
        h("div", { class: "detail-status-row" }, badge, h("span", { class: "grow" }), action),
        h("div", { class: "job-barline" }, bar.el, els.pct),
        els.stepLine,
        els.message,
      ),
      els.error,
      els.asked,
      (els.stepsSection = h(
        "section",
        { class: "detail-section", "aria-labelledby": "steps-title" },
        h("h3", { id: "steps-title" }, "Steps"),
        els.steps,
      )),
      (els.childrenSection = h(
        "section",
        { class: "detail-section", hidden: true, "aria-labelledby": "children-title" },
        h("h3", { id: "children-title" }, "Child jobs"),
        els.children,
      )),
      els.result,
      h(
        "section",
        { class: "detail-section", "aria-labelledby": "log-title" },
        h("h3", { id: "log-title" }, "Activity"),
        els.logEmpty,
        els.log,
      ),
      h(
        "section",
        { class: "detail-section", "aria-labelledby": "facts-title" },
        h("h3", { id: "facts-title" }, "Details"),
        els.facts,
        h("details", { class: "raw-details" }, h("summary", null, "Input (JSON)"), els.input),
      ),
    );
  }

  _notFound(error) {
    this.showingMessage = true;
    fill(
      this.body,
      h(
        "header",
        { class: "detail-head" },
        h("div", { class: "detail-heading" }, h("h2", { id: "detail-title", class: "detail-title", tabindex: "-1" }, "Job not found")),
        h("button", { type: "button", class: "btn btn-ghost detail-close", "aria-label": "Close job details", on: { click: () => this.onClose() } }, "✕"),
      ),
      h("p", { class: "detail-section" }, error.status === 404 ? "There is no job with this id. It may have expired." : error.message),
    );
  }

  _log(type, data) {
    const els = this.els;
    let level = "event";
    let text;
    switch (type) {
      case "log":
        level = data.level || "info";
        text = data.message;
        break;
      case "queued":
        text = data.reason === "retry" ? "Queued again (retry)" : "Queued";
        break;
      case "started":
        text = `Attempt ${data.attempt}${data.max_attempts ? ` of ${data.max_attempts}` : ""} started`;
        break;
      case "retrying":
        level = "warning";
        text = `Attempt ${data.attempt} failed: ${data.error?.message || "error"}. Retrying at ${clockTime(data.retry_at)}`;
        break;
      case "failed":
        level = "error";
        text = `Failed: ${data.error?.message || "error"}`;
        break;
      case "cancelled":
        level = "warning";
        text = `Cancelled${data.reason ? `: ${data.reason}` : ""}`;
        break;
      case "waiting":
        level = "warning";
        text = data.children
          ? `Waiting for ${data.children.size - data.children.done} child jobs`
          : `Waiting for input “${data.name}”${data.prompt ? `: ${data.prompt}` : ""}`;
        break;
      case "child":
        if (!data.counts || data.child.state === "completed") return; // the list shows them
        level = "warning";
        text = `Child ${(data.child.index ?? 0) + 1} ${data.child.state}${data.child.error ? `: ${data.child.error.message}` : ""}`;
        break;
      case "input":
        text = `Input “${data.name}” given by ${data.by}`;
        break;
      case "completed":
        text = data.cached ? `Completed from the result cache (job ${shortId(data.source)})` : "Completed";
        break;
      case "progress":
        if (!data.child) return; // progress has its own place
        level = data.child.state === "completed" ? "event" : "warning";
        text = `Item ${(data.child.index ?? 0) + 1} ${data.child.state}${data.child.error ? `: ${data.child.error.message}` : ""} · ${data.message || ""}`;
        break;
      default:
        return; // steps have their own place
    }
    els.logEmpty.hidden = true;
    els.log.hidden = false;
    const log = els.log;
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 8;
    log.appendChild(
      h(
        "li",
        { class: `log-line log-${level}` },
        h("time", { datetime: data.at }, clockTime(data.at)),
        h("span", { class: "log-level" }, level),
        h("span", { class: "log-text" }, text),
      ),
    );
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  render() {
    const job = this.job;
    const record = this.record;
    if (!job || !record) return;
    const els = this.els;
    const task = this.taskOf(record.task);
    setText(els.title, taskTitle(record.task, this.taskOf));
    const label = inputLabel(record);
    setText(els.subtitle, [label, `Job ${shortId(record.id)}`].filter(Boolean).join(" · "));
    els.subtitle.title = record.id;
    setText(els.badge, STATE_LABELS[record.state] || record.state);
    els.badge.dataset.state = record.state;
    this.panel.dataset.state = record.state;
    const value = percent(record);
    updateBar(els.bar, value, record.state);
    setText(els.pct, `${value}%`);
    setText(els.stepLine, stepLine(record, task));
    // The line keeps its height in every state, so nothing below it moves as events arrive.
    const took = record.state === "completed" ? duration(elapsedMs(record)) : "";
    setText(els.message, took ? `Finished in ${took}` : messageLine(record));

    let action = "";
    if (canCancel(record)) action = "cancel";
    else if (canRetry(record)) action = "retry";
    if (els.action.dataset.action !== action) {
      els.action.dataset.action = action;
      delete els.action.dataset.pending;
      els.action.disabled = false;
      els.action.hidden = !action;
      setText(els.action, action === "cancel" ? "Cancel job" : "Retry job");
    }

    this._renderError(record, task);
    this.asked.render(record);
    this._renderSteps(record, task);
    this._renderChildren();
    this._renderResult(record);
    this._renderFacts(record);
  }

  _renderChildren() {
    const job = this.job;
    const rows = [...job.children.values()].sort((a, b) => (a.index ?? 0) - (b.index ?? 0) || (a.id < b.id ? -1 : 1));
    const key = JSON.stringify(rows.map((c) => [c.id, c.state]));
    if (key === job.childrenKey) return;
    job.childrenKey = key;
    this.els.childrenSection.hidden = rows.length === 0;
    // The first CHILD_ROWS: a list a person reads, rebuilt as children change.
    const more = rows.length - CHILD_ROWS;
    fill(
      this.els.children,
      rows.slice(0, CHILD_ROWS).map((child) =>
        h(
          "li",
          { class: "child-row", dataset: { id: child.id, state: child.state } },
          h("a", { href: `#/jobs/${child.id}`, class: "child-link" }, `${(child.index ?? 0) + 1}. ${taskTitle(child.task, this.taskOf)}`),
          h("span", { class: "badge", dataset: { state: child.state } }, STATE_LABELS[child.state] || child.state),
        ),
      ),
      more > 0 ? h("li", { class: "muted child-more" }, `…and ${more} more`) : null,
    );
  }

  tick() {
    if (this.job && this.record && !TERMINAL.has(this.record.state)) {
      this._renderFacts(this.record);
      this._renderSteps(this.record, this.taskOf(this.record.task));
    }
  }

  _renderError(record, task) {
    const els = this.els;
    const error = record.state === "failed" || record.state === "retrying" ? record.error : null;
    const key = error ? JSON.stringify([record.state, error]) : null;
    if (key === this.job.renderedError) return;
    this.job.renderedError = key;
    els.error.hidden = !error;
    if (!error) return clear(els.error);
    const where = failedStepRef(record, task);
    const count = task?.steps?.length || record.step?.count;
    const place = where ? ` ${where.after ? "after" : "at"} step ${where.index} of ${count} (${where.name})` : "";
    const headline =
      record.state === "retrying"
        ? `Attempt ${record.attempt} failed${place}; it will be retried`
        : `The job failed${place}`;
    fill(
      els.error,
      h("h3", { id: "error-title" }, headline),
      h("p", { class: "error-message" }, error.message),
      h(
        "p",
        { class: "muted error-meta" },
        `${error.type}${error.retryable ? " · may succeed if run again" : " · a permanent error: running it again will likely fail the same way"}`,
      ),
    );
  }

  _renderSteps(record, task) {
    const els = this.els;
    const names = task?.steps || [];
    const count = Math.max(names.length, record.step?.count || 0, ...(record.steps || []).map((s) => s.index));
    const byIndex = new Map((record.steps || []).map((s) => [s.index, s]));
    const now = Date.now();
    els.stepsSection.hidden = count === 0; // a batch parent has items, not steps
    while (els.steps.children.length > count) els.steps.lastChild.remove();
    for (let index = 1; index <= count; index++) {
      const step = byIndex.get(index) || { index, name: names[index - 1] || `Step ${index}`, state: "pending" };
      let li = els.steps.children[index - 1];
      if (!li) {
        li = h(
          "li",
          { class: "tl-step" },
          h("span", { class: "tl-dot", "aria-hidden": "true" }),
          h(
            "div",
            { class: "tl-main" },
            h("div", { class: "tl-row" }, h("span", { class: "tl-name" }), h("span", { class: "tl-state" }), h("span", { class: "tl-time" })),
            h("div", { class: "tl-output" }),
            h("div", { class: "tl-text", "aria-live": "off" }),
          ),
        );
        els.steps.appendChild(li);
      }
      li.dataset.state = step.state;
      setText(li.querySelector(".tl-name"), `${index}. ${step.name}`);
      setText(li.querySelector(".tl-state"), STEP_STATE_LABELS[step.state] || step.state);
      let time = "";
      if (step.duration_ms !== null && step.duration_ms !== undefined && ["completed", "restored"].includes(step.state)) {
        time = duration(step.duration_ms);
      } else if (step.started_at) {
        const start = parseTime(step.started_at);
        const end = parseTime(step.finished_at) ?? (TERMINAL.has(record.state) ? null : now);
        if (start !== null && end !== null) time = duration(end - start);
      }
      setText(li.querySelector(".tl-time"), time);
      const usage = step.usage?.calls ? `LLM: ${usageText(step.usage)}` : "";
      const output = [inlineValue(step.output), usage].filter(Boolean).join(" · ");
      const outEl = li.querySelector(".tl-output");
      setText(outEl, output);
      outEl.hidden = !output;
      // The text the step writes as it goes (a model's reply): it grows under the running step.
      const textEl = li.querySelector(".tl-text");
      setText(textEl, step.text || "");
      textEl.hidden = !step.text;
    }
  }

  _renderResult(record) {
    const els = this.els;
    const show = record.state === "completed" && record.result !== undefined;
    const key = show ? JSON.stringify(record.result) : null;
    if (key === this.job.renderedResult) return;
    this.job.renderedResult = key;
    els.result.hidden = !show;
    if (!show) return clear(els.result);
    fill(
      els.result,
      h("h3", { id: "result-title" }, "Result"),
      h("div", { class: "result" }, renderValue(record.result)),
      h("details", { class: "raw-details" }, h("summary", null, "Raw JSON"), h("pre", { class: "raw" }, rawJson(record.result))),
    );
  }

  _renderFacts(record) {
    const els = this.els;
    const facts = [
      ["Job id", record.id],
      record.batch_id ? ["Batch", `item ${(record.batch_index ?? 0) + 1} of batch ${shortId(record.batch_id)}`] : null,
      record.batch ? ["Items", `${record.batch.size}: ${record.batch.completed} completed, ${record.batch.failed} failed, ${record.batch.cancelled} cancelled`] : null,
      record.parent
        ? ["Parent", h("a", { href: `#/jobs/${record.parent}`, class: "parent-link" }, `child ${(record.parent_index ?? 0) + 1} of job ${shortId(record.parent)}`)]
        : null,
      record.children
        ? ["Children", `${record.children.size}: ${record.children.completed} completed, ${record.children.failed} failed, ${record.children.cancelled} cancelled`]
        : null,
      record.children?.cost ? ["Children's cost", number(record.children.cost)] : null,
      record.run_at ? ["Scheduled for", dateTime(record.run_at)] : null,
      ["Created", dateTime(record.created_at)],
      ["Started", record.started_at ? dateTime(record.started_at) : "not yet"],
      ["Finished", record.finished_at && TERMINAL.has(record.state) ? dateTime(record.finished_at) : "—"],
      ["Elapsed", duration(elapsedMs(record)) || "—"],
      ["Attempt", record.attempt ? `${record.attempt} of ${record.max_attempts}` : "not started"],
      record.usage?.calls ? ["LLM usage", usageText(record.usage)] : null,
      record.usage?.calls || record.budget != null
        ? ["Cost", `${number(record.cost || 0)}${record.budget != null ? ` of a ${number(record.budget)} budget` : ""}`]
        : null,
    ].filter(Boolean);
    const key = JSON.stringify(facts.map(([k, v]) => [k, v instanceof Node ? `${v.textContent}@${v.getAttribute("href")}` : v]));
    if (key !== this._factsKey) {
      this._factsKey = key;
      fill(els.facts, facts.map(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
    }
    const input = rawJson(record.input);
    if (els.input.textContent !== input) els.input.textContent = input;
  }
}

function usageText(usage) {
  const calls = `${usage.calls} ${usage.calls === 1 ? "call" : "calls"}`;
  return `${calls} · ${number(usage.input_tokens)} tokens in, ${number(usage.output_tokens)} out · ${duration(usage.duration_ms)}`;
}
