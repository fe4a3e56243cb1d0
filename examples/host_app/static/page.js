// Acme's page: its own backend for sign-in, jobs and tokens; Stepstream's browser client for
// progress. The client is loaded from the Stepstream server, whose CORS allows this origin.

const $ = (selector, root = document) => root.querySelector(selector);
const api = async (path, init = {}) => {
  const response = await fetch(path, {
    headers: { "content-type": "application/json" },
    credentials: "same-origin",
    ...init,
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error?.message || body.error || response.statusText);
  return body;
};

// What the page received, for anyone curious (and for the end-to-end test).
window.acme = { events: {}, ended: {}, tokenFetches: 0, tokenReasons: [], errors: [] };

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const watching = new Map(); // job id -> stop()
let client;

function row(jobId) {
  let li = $(`li[data-job-id="${CSS.escape(jobId)}"]`);
  if (li) return li;
  li = document.createElement("li");
  li.className = "report";
  li.dataset.jobId = jobId;
  li.innerHTML = `<strong class="title"></strong> <span class="state"></span>
    <div class="step"></div><progress max="1" value="0"></progress>
    <ol class="steps"></ol><div class="result"></div>`;
  $(".title", li).textContent = `Report ${jobId.slice(0, 6)}`;
  $("#reports").prepend(li);
  return li;
}

function show(record) {
  const li = row(record.id);
  li.dataset.state = record.state;
  $(".state", li).textContent = record.state;
  if (record.step) {
    $(".step", li).textContent =
      `Step ${record.step.index} of ${record.step.count} · ${record.step.name}`;
  }
  $("progress", li).value = record.progress ?? 0;
  if (record.state === "completed") {
    const { summary = "", keywords = [] } = record.result || {};
    $(".result", li).textContent = `${summary}\nKeywords: ${keywords.slice(0, 5).join(", ")}`;
  }
}

async function jobToken(jobId, reason) {
  window.acme.tokenFetches += 1;
  window.acme.tokenReasons.push(reason);
  return (await api(`/reports/${encodeURIComponent(jobId)}/token`, { method: "POST" })).token;
}

function watch(jobId) {
  if (watching.has(jobId)) return;
  const li = row(jobId);
  const seen = (window.acme.events[jobId] ||= []);
  const stop = client.watchJob(jobId, {
    baseUrl: window.acme.stepstream,
    // Called on the first connect, when a token runs out, and on a 401.
    getToken: ({ reason }) => jobToken(jobId, reason),
    after: "0",
    onEvent(event) {
      seen.push({ id: event.id, type: event.type });
      const data = event.data;
      if (event.type === "step") {
        $(".step", li).textContent =
          `Step ${data.step.index} of ${data.step.count} · ${data.step.name}`;
        const item = document.createElement("li");
        item.textContent = data.step.name;
        $(".steps", li).append(item);
        $("progress", li).value = (data.step.index - 1) / data.step.count;
      } else if (event.type === "progress" && data.message) {
        $(".step", li).title = data.message;
      } else if (TERMINAL.has(event.type) || event.type === "started") {
        li.dataset.state = event.type === "started" ? "running" : event.type;
        $(".state", li).textContent = li.dataset.state;
      }
    },
    onEnd(record) {
      window.acme.ended[jobId] = (window.acme.ended[jobId] || 0) + 1;
      show(record);
      watching.delete(jobId);
    },
    onError(error) {
      // Not fatal: no answer for a while (the server is down, or this origin is not allowed);
      // the watch goes on trying.
      if (!error.fatal) return console.warn(error.message);
      window.acme.errors.push(String(error?.message || error));
    },
  });
  watching.set(jobId, stop);
}

async function start(session) {
  $("#who").textContent = `Signed in as ${session.user}`;
  $("#app").hidden = false;
  window.acme.stepstream = session.stepstream;
  client = await import(`${session.stepstream}/stepstream.js`);
  const { jobs } = await api("/reports");
  for (const record of jobs.reverse()) {
    show(record);
    watch(record.id);
  }
  // Jobs this user starts elsewhere (another tab, the product's backend) appear live.
  client.watchAll({
    baseUrl: session.stepstream,
    getToken: async () => (await api("/feed/token", { method: "POST" })).token,
    onEvent(event) {
      if (event.type === "queued") watch(event.data.job_id);
    },
    onState(state) {
      const badge = $("#connection");
      badge.dataset.state = state;
      badge.textContent = state[0].toUpperCase() + state.slice(1);
    },
  });
  $("#new-report").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = new FormData(e.target);
    const record = await api("/reports", {
      method: "POST",
      body: JSON.stringify({ text: form.get("text"), pace: Number(form.get("pace")) }),
    });
    show(record);
    watch(record.id);
  });
}

const session = await api("/session");
if (session.user) {
  await start(session);
} else {
  $("#signin").hidden = false;
  $("#signin").addEventListener("submit", async (e) => {
    e.preventDefault();
    const user = new FormData(e.target).get("user");
    $("#signin").hidden = true;
    await start(await api("/session", { method: "POST", body: JSON.stringify({ user }) }));
  });
}
