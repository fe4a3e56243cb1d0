// Stepstream dashboard: one firehose stream for the list, one stream per open detail view, both
// followed by stepstream.js (the browser client every page can use).
//
// Every URL is relative: the dashboard works where the app is mounted (`/` or `/progress/`).

import { watchAll } from "../stepstream.js";
import { $, h, fill, setText } from "./js/dom.js";
import { api, auth, streamToken } from "./js/api.js";
import { applyEvent, compareIds, TERMINAL } from "./js/model.js";
import { TaskForm } from "./js/form.js";
import { JobList } from "./js/list.js";
import { DetailView } from "./js/detail.js";
import { renderStats } from "./js/stats.js";
import { shortId } from "./js/format.js";

const STATS_EVERY_MS = 5_000;
const RECONCILE_EVERY_MS = 30_000;
const MAX_ROWS = 200;

const tasks = new Map();
const jobs = new Map();
let nextCursor = null;
let listLoading = 0;
let buffered = [];
const pendingFetch = new Map();

const taskOf = (name) => tasks.get(name);

// -- Connection indicator -------------------------------------------------------------------
// What the streams say (stepstream.js reports "offline" after 15 s without a working stream),
// never navigator.onLine: a loopback server streams fine while the browser believes it is
// offline, and a captive portal is "online".

const conn = { el: $("#conn"), state: "connecting" };

function updateConnection() {
  if (signedOut) return;
  const states = [firehoseState, detail?.streamStatus].filter(Boolean);
  let state = "live";
  if (states.includes("offline") || states.includes("closed")) state = "offline";
  else if (states.includes("reconnecting")) state = "reconnecting";
  else if (states.includes("connecting")) state = "connecting";
  if (state === conn.state) return;
  conn.state = state;
  conn.el.dataset.state = state;
  document.body.dataset.conn = state; // the queue-health numbers fade while they may be stale
  const labels = {
    live: "Live",
    reconnecting: "Reconnecting…",
    connecting: "Connecting…",
    offline: "Offline",
  };
  setText(conn.el.querySelector(".conn-text"), labels[state]);
  conn.el.title =
    state === "offline"
      ? "The server cannot be reached; the page keeps trying and catches up when it is back."
      : state === "reconnecting"
        ? "The connection dropped; reconnecting and catching up on missed events."
        : "Receiving updates as they happen.";
}

// -- Toasts ---------------------------------------------------------------------------------

function toast(message, kind = "info") {
  const el = h("div", { class: `toast toast-${kind}` }, message);
  $("#toasts").appendChild(el);
  setTimeout(() => el.remove(), 5000);
}

// -- Jobs -----------------------------------------------------------------------------------

const list = new JobList($("#jobs"), {
  taskOf,
  onAction: act,
  emptyEl: $("#jobs-empty"),
  countEl: $("#jobs-count"),
});

const dirty = new Set();
let renderQueued = false;

function scheduleRender(id) {
  dirty.add(id);
  if (renderQueued) return;
  renderQueued = true;
  const run = () => {
    if (!renderQueued) return;
    renderQueued = false;
    for (const jobId of dirty) {
      const record = jobs.get(jobId);
      if (record) list.upsert(record);
    }
    dirty.clear();
    prune();
    const active = [...jobs.values()].filter((r) => !TERMINAL.has(r.state)).length;
    const title = active ? `(${active}) Stepstream` : "Stepstream";
    if (document.title !== title) document.title = title;
  };
  requestAnimationFrame(run);
  setTimeout(run, 100); // rAF does not run in a hidden tab
}

/** A long session keeps the newest MAX_ROWS jobs on the page (finished ones go first). */
function prune() {
  if (jobs.size <= MAX_ROWS + 50) return;
  const finished = [...jobs.values()]
    .filter((r) => TERMINAL.has(r.state) && r.id !== detail.openId)
    .sort((a, b) => (a.created_at < b.created_at ? -1 : 1));
  for (const record of finished.slice(0, jobs.size - MAX_ROWS)) {
    jobs.delete(record.id);
    list.remove(record.id);
  }
}

/** Keep whichever copy of a record is further along its log. */
function mergeRecord(record) {
  const current = jobs.get(record.id);
  if (current && compareIds(record.last_event_id, current.last_event_id) < 0) return current;
  jobs.set(record.id, record);
  scheduleRender(record.id);
  return record;
}

async function loadList({ more = false } = {}) {
  listLoading += 1;
  try {
    const query = more && nextCursor ? `?limit=100&cursor=${encodeURIComponent(nextCursor)}` : "?limit=100";
    const { data } = await api(`api/jobs${query}`);
    for (const record of data.jobs) mergeRecord(record);
    if (!more || nextCursor) nextCursor = data.next_cursor;
    $("#load-more").hidden = !nextCursor;
    list.showEmpty();
    foldFormOnPhones();
  } catch (error) {
    if (!jobs.size) toast(`Could not load jobs: ${error.message}`, "error");
  } finally {
    listLoading -= 1;
    if (!listLoading) {
      const events = buffered;
      buffered = [];
      for (const event of events) onFirehose(event.type, event);
    }
  }
}

function onFirehose(type, data) {
  if (type === "reset") {
    loadList(); // events after our cursor were trimmed: the records are the truth
    return;
  }
  if (listLoading) {
    buffered.push(data);
    return;
  }
  const id = data.job_id;
  if (!id) return;
  detail.noticeEvent(id, data.event_id);
  const record = jobs.get(id);
  if (!record) {
    noteUnknown(id, data);
    return;
  }
  if (compareIds(data.event_id, record.last_event_id) <= 0) return; // already in the record
  applyEvent(record, data, data.event_id);
  scheduleRender(id);
  if (TERMINAL.has(data.type)) refreshStatsSoon();
}

// -- Jobs we have no record of ------------------------------------------------------------
// New jobs (from another tab, a script, a batch of hundreds) are found with ONE list fetch
// (they are the newest); the few still missing after it are fetched one by one. Their events
// wait meanwhile and are applied in order before anything that arrived later.

const MAX_SINGLE_FETCHES = 20;
const OLD_EVENT_MS = 10 * 60_000;
let unknown = new Map(); // job id -> its events, oldest first
let unknownTimer = null;
const listedOnce = new WeakSet(); // events already given a list fetch

function noteUnknown(id, event) {
  const inFlight = pendingFetch.get(id);
  if (inFlight) {
    inFlight.push(event);
    return;
  }
  if (listedOnce.has(event)) {
    fetchUnknown(id, event);
    return;
  }
  if (!unknown.has(id)) {
    // A backlog replay (after a reset) brings old jobs' events: those stay off the page.
    const at = Date.parse(event.at);
    if (event.type !== "queued" && Date.now() - at > OLD_EVENT_MS) return;
    unknown.set(id, []);
  }
  unknown.get(id).push(event);
  unknownTimer ??= setTimeout(resolveUnknown, 150);
}

function resolveUnknown() {
  unknownTimer = null;
  const waiting = [...unknown.values()].flat();
  unknown = new Map();
  for (const event of waiting) listedOnce.add(event);
  // Older than anything buffered from now on: they go first.
  buffered.unshift(...waiting);
  loadList();
}

/** One job we still have no record of: fetch it, then replay what arrived meanwhile. */
async function fetchUnknown(id, event) {
  if (pendingFetch.size >= MAX_SINGLE_FETCHES) return; // a flood: "Show older jobs" has them
  pendingFetch.set(id, [event]);
  try {
    const { data } = await api(`api/jobs/${encodeURIComponent(id)}`);
    const record = mergeRecord(data);
    for (const e of pendingFetch.get(id) || []) {
      if (compareIds(e.event_id, record.last_event_id) > 0) applyEvent(record, e, e.event_id);
    }
    scheduleRender(id);
    refreshStatsSoon();
  } catch {
    // expired or not ours: nothing to show
  } finally {
    pendingFetch.delete(id);
  }
}

async function act(action, record, button) {
  if (!action) return;
  button.disabled = true;
  button.dataset.pending = "1";
  try {
    if (action === "cancel") {
      button.textContent = "Cancelling…";
      const { status, data } = await api(`api/jobs/${encodeURIComponent(record.id)}/cancel`, { method: "POST" });
      if (status === 200) mergeRecord(data);
      else toast(`Cancelling job ${shortId(record.id)}: the worker stops it at its next step.`);
    } else if (action === "retry") {
      button.textContent = "Retrying…";
      const { data } = await api(`api/jobs/${encodeURIComponent(record.id)}/retry`, { method: "POST" });
      mergeRecord(data);
      if (detail.openId === record.id) detail.follow();
    }
    refreshStatsSoon();
  } catch (error) {
    toast(error.status === 409 ? `Job ${shortId(record.id)}: ${error.message}.` : error.message, "error");
    delete button.dataset.pending;
    button.dataset.action = ""; // drawn again below from the record
    button.disabled = false;
    const current = jobs.get(record.id);
    if (current) {
      list.upsert(current);
      // A 409 means our copy is behind: fetch the truth.
      api(`api/jobs/${encodeURIComponent(record.id)}`).then(({ data }) => mergeRecord(data), () => {});
    }
    detail.render();
  }
}

$("#load-more").addEventListener("click", () => loadList({ more: true }));

// -- Detail view and routing ----------------------------------------------------------------

const detail = new DetailView({
  panel: $("#detail"),
  body: $("#detail-body"),
  backdrop: $("#detail-backdrop"),
  taskOf,
  onAction: act,
  onClose: () => {
    const id = detail.openId;
    history.pushState(null, "", location.pathname + location.search);
    route();
    const link = id && document.querySelector(`li.job[data-job-id="${CSS.escape(id)}"] .job-link`);
    if (link) link.focus({ preventScroll: true });
  },
  onStatus: updateConnection,
});

function route() {
  const match = location.hash.match(/^#\/jobs\/([A-Za-z0-9_-]{1,64})$/);
  if (match) detail.open(match[1], jobs.get(match[1]));
  else detail.close();
  updateConnection();
}

window.addEventListener("hashchange", route);
window.addEventListener("popstate", route);

// -- The form -------------------------------------------------------------------------------

const form = new TaskForm({ fieldsEl: $("#form-fields"), errorsEl: $("#form-errors") });
const taskSelect = $("#task-select");

function selectTask(name) {
  const task = tasks.get(name);
  if (!task) return;
  form.build(task);
  setText($("#task-description"), task.description || "");
  fill(
    $("#task-steps"),
    h("span", { class: "muted" }, `${task.steps.length} steps: `),
    task.steps.join(" → "),
  );
  $("#fill-sample").disabled = !task.sample_input;
  $("#fill-sample").title = task.sample_input ? "Fill the form with this task's sample input" : "This task has no sample input";
  setText($("#form-status"), "");
}

async function loadTasks() {
  const { data } = await api("api/tasks");
  tasks.clear();
  for (const task of data.tasks) tasks.set(task.name, task);
  const previous = taskSelect.value;
  // Tasks with a sample first: those are the ones a newcomer can try with one click.
  const ordered = [...data.tasks].sort((a, b) => Boolean(b.sample_input) - Boolean(a.sample_input));
  fill(
    taskSelect,
    ordered.map((t) => h("option", { value: t.name }, t.title || t.name)),
  );
  taskSelect.disabled = false;
  $("#submit-job").disabled = false;
  if (tasks.has(previous)) taskSelect.value = previous;
  selectTask(taskSelect.value);
  for (const record of jobs.values()) scheduleRender(record.id);
}

taskSelect.addEventListener("change", () => selectTask(taskSelect.value));

// On narrow screens the form starts folded when there are jobs to look at.
const formPanel = $(".form-panel");
const formToggle = $("#form-toggle");
function setFormOpen(open) {
  formPanel.classList.toggle("collapsed", !open);
  formToggle.setAttribute("aria-expanded", String(open));
  setText(formToggle, open ? "Hide" : "Show");
}
formToggle.addEventListener("click", () => setFormOpen(formPanel.classList.contains("collapsed")));
let formFolded = false;
function foldFormOnPhones() {
  if (formFolded || !matchMedia("(max-width: 960px)").matches) return;
  formFolded = true;
  setFormOpen(jobs.size === 0);
}
$("#fill-sample").addEventListener("click", () => form.fillSample());

$("#job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const task = taskSelect.value;
  const read = form.read();
  if (read.errors) {
    form.showErrors("Some fields need attention.", read.errors);
    return;
  }
  const submit = $("#submit-job");
  submit.disabled = true;
  setText($("#form-status"), "Starting…");
  try {
    const { data } = await api("api/jobs", { method: "POST", body: { task, input: read.input } });
    form.clearErrors();
    mergeRecord(data);
    fill(
      $("#form-status"),
      `Started job ${shortId(data.id)}. `,
      h("a", { href: `#/jobs/${encodeURIComponent(data.id)}` }, "Open it"),
    );
    refreshStatsSoon();
  } catch (error) {
    setText($("#form-status"), "");
    if (error.status === 422 || error.status === 400 || error.status === 413) form.showApiError(error);
    else form.showErrors(error.message || "The job could not be started.", []);
  } finally {
    submit.disabled = false;
  }
});

// -- Queue health ---------------------------------------------------------------------------

let statsTimer = null;

async function refreshStats() {
  clearTimeout(statsTimer);
  if (signedOut) return;
  try {
    const { data } = await api("api/stats");
    renderStats($("#stats"), data, taskOf);
  } catch {
    // the strip keeps its last numbers; the indicator says why
  }
  statsTimer = setTimeout(refreshStats, STATS_EVERY_MS);
}

let statsSoon = null;
function refreshStatsSoon() {
  clearTimeout(statsSoon);
  statsSoon = setTimeout(refreshStats, 400);
}

// -- Sign in (production mode) --------------------------------------------------------------

let signedOut = false;

function showSignin(message) {
  if (signedOut) return;
  signedOut = true;
  stopFirehose?.();
  detail.close(false);
  clearTimeout(statsTimer);
  const panel = $("#signin");
  panel.hidden = false;
  const error = $("#signin-error");
  error.hidden = !message;
  setText(error, message || "");
  $("#signin-key").focus();
  conn.el.dataset.state = "offline";
  conn.state = "signed-out";
  setText(conn.el.querySelector(".conn-text"), "Signed out");
}

auth.onUnauthorized = (error) => {
  showSignin(auth.key ? `The server refused the stored API key: ${error.message}` : null);
};

$("#signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("#signin-key").value.trim();
  const error = $("#signin-error");
  if (!key) {
    error.hidden = false;
    setText(error, "Enter an API key.");
    return;
  }
  try {
    await api("api/tasks", { key, quiet: true });
  } catch (exc) {
    error.hidden = false;
    setText(error, exc.status === 401 ? "That API key is not valid." : exc.message);
    return;
  }
  auth.set(key);
  location.reload();
});

$("#sign-out").hidden = !auth.key;
$("#sign-out").addEventListener("click", () => {
  auth.clear();
  location.reload();
});

// -- Start ----------------------------------------------------------------------------------

let stopFirehose = null;
let firehoseState = null;
let tasksLoaded = false;

async function ensureTasks() {
  if (tasksLoaded) return;
  try {
    await loadTasks();
    tasksLoaded = true;
  } catch (error) {
    if (error.status !== 401) setText($("#form-status"), `Could not load tasks: ${error.message}`);
  }
}

function startFirehose() {
  stopFirehose?.();
  firehoseState = "connecting";
  stopFirehose = watchAll({
    getToken: streamToken("api/events/token"),
    onEvent: ({ type, data }) => onFirehose(type, data),
    onState: (state) => {
      const was = firehoseState;
      firehoseState = state;
      // Each time the stream is back: the records are fetched again, so an event written
      // while no connection was listening is still shown (the firehose resumes by id as well).
      if (state === "live" && was !== "live") {
        loadList();
        ensureTasks();
      }
      updateConnection();
    },
    onError: (error) => {
      // Not fatal (no answer for a while): the badge already reads Reconnecting or Offline.
      if (!error.fatal) return;
      // Refused for good (the key was revoked, a proxy answers something else): say so, and
      // start over in a while, from now.
      if (signedOut) return;
      toast(`Live updates stopped: ${error.message}`, "error");
      setTimeout(() => signedOut || startFirehose(), 10_000);
    },
  });
}

async function start() {
  // The task catalogue first: it also tells us whether this server wants an API key.
  try {
    await loadTasks();
    tasksLoaded = true;
  } catch (error) {
    if (error.status === 401) return; // the sign-in panel is showing
    setText($("#form-status"), `Could not load tasks: ${error.message}`);
  }
  startFirehose();
  loadList();
  refreshStats();
  route();
  setInterval(() => {
    for (const step of [updateConnection, () => list.tick(), () => detail.tick()]) {
      try {
        step();
      } catch (error) {
        console.warn("tick", error);
      }
    }
  }, 1000);
  setInterval(() => {
    const active = [...jobs.values()].some((r) => !TERMINAL.has(r.state));
    if (active && document.visibilityState === "visible" && firehoseState === "live") loadList();
  }, RECONCILE_EVERY_MS);
  // Back to this page from the browser's back/forward cache: catch up at once.
  window.addEventListener("pageshow", (event) => {
    if (!event.persisted || signedOut) return;
    if (firehoseState === "closed") startFirehose();
    loadList();
    refreshStats();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") refreshStats();
  });
}

start();
