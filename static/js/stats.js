// The queue-health strip, from GET /api/stats.

import { h, fill } from "./dom.js";
import { humanize, number, seconds } from "./format.js";

const STATES = ["queued", "running", "retrying", "completed", "failed", "cancelled"];

function percent(value) {
  return value === null || value === undefined ? "–" : `${Math.round(value * 1000) / 10}%`;
}

export function renderStats(el, stats, taskOf) {
  const total = stats.total || { counts: {} };
  const wasOpen = el.querySelector("details.stats-by-task")?.open || false;
  const tile = (label, value, state, title) =>
    h(
      "div",
      { class: "stat", dataset: state ? { state } : {}, title: title || null },
      h("span", { class: "stat-value" }, value),
      h("span", { class: "stat-label" }, label),
    );
  const scheduled = total.counts?.scheduled || 0;
  const oldest = stats.oldest_queued_age;
  const workers = stats.workers_alive;
  const rows = Object.entries(stats.tasks || {}).filter(([, t]) =>
    [...STATES, "scheduled"].some((s) => (t.counts?.[s] || 0) > 0),
  );
  const window = stats.window_seconds ? `last ${Math.round(stats.window_seconds / 3600)} h` : null;
  fill(
    el,
    h(
      "div",
      { class: "stats-row" },
      STATES.map((s) =>
        tile(
          humanize(s),
          number(total.counts?.[s] || 0),
          s,
          s === "queued" && scheduled ? `${scheduled} more scheduled for later` : ["completed", "failed", "cancelled"].includes(s) && window ? `Finished in the ${window}` : null,
        ),
      ),
      tile(
        oldest ? `Queue · oldest ${seconds(oldest)}` : "Queue depth",
        number(stats.queue_depth ?? 0),
        null,
        "Jobs waiting for a worker",
      ),
      tile("p50 / p95", `${seconds(total.duration_p50)} / ${seconds(total.duration_p95)}`, null, "Run time of completed jobs"),
      workers === undefined
        ? tile("Streams open", number(stats.streams_open ?? 0), null, "Live connections to this web process")
        : tile(workers === 1 ? "Worker" : "Workers", number(workers), workers === 0 ? "failed" : null, "Workers alive (heartbeat)"),
    ),
    h(
      "div",
      { class: "stats-foot" },
      rows.length
        ? h(
            "details",
            { class: "stats-by-task", open: wasOpen },
            h("summary", null, "By task"),
            h(
              "div",
              { class: "v-table-wrap" },
              h(
                "table",
                { class: "v-table" },
                h(
                  "thead",
                  null,
                  h(
                    "tr",
                    null,
                    h("th", { scope: "col" }, "Task"),
                    STATES.map((s) => h("th", { scope: "col" }, humanize(s))),
                    h("th", { scope: "col" }, "Failure rate"),
                    h("th", { scope: "col" }, "p50"),
                    h("th", { scope: "col" }, "p95"),
                  ),
                ),
                h(
                  "tbody",
                  null,
                  rows.map(([name, t]) =>
                    h(
                      "tr",
                      null,
                      h("th", { scope: "row" }, taskOf(name)?.title || name),
                      STATES.map((s) => h("td", { class: "num" }, number(t.counts?.[s] || 0))),
                      h("td", { class: "num" }, percent(t.failure_rate)),
                      h("td", { class: "num" }, seconds(t.duration_p50)),
                      h("td", { class: "num" }, seconds(t.duration_p95)),
                    ),
                  ),
                ),
              ),
            ),
          )
        : null,
      h(
        "span",
        { class: "stats-note" },
        [window ? `Finished counts: ${window}` : null, `${number(stats.streams_open ?? 0)} live ${stats.streams_open === 1 ? "stream" : "streams"} on this web process`]
          .filter(Boolean)
          .join(" · "),
      ),
    ),
  );
}
