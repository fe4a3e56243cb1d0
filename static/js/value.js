// JSON values rendered for people: definition lists, tables, chips. Text only, never HTML.

import { h } from "./dom.js";
import { humanize, number } from "./format.js";

const isPlain = (v) => v === null || ["string", "number", "boolean"].includes(typeof v);

export function scalar(value) {
  if (value === null || value === undefined) return h("span", { class: "v-null" }, "—");
  if (typeof value === "boolean") return h("span", { class: "v-bool" }, value ? "yes" : "no");
  if (typeof value === "number") return h("span", { class: "v-num" }, number(value));
  const text = String(value);
  return h("span", { class: text.includes("\n") ? "v-str v-multiline" : "v-str" }, text);
}

/** A readable rendering of any JSON value. */
export function renderValue(value, depth = 0) {
  if (isPlain(value) || value === undefined) return scalar(value);
  if (depth > 3) return h("code", { class: "v-json" }, JSON.stringify(value));
  if (Array.isArray(value)) {
    if (value.length === 0) return h("span", { class: "v-null" }, "none");
    if (value.every((v) => typeof v === "string" && v.length <= 40)) {
      return h("ul", { class: "chips" }, value.map((v) => h("li", { class: "chip" }, v)));
    }
    if (value.every(isPlain)) {
      return h("ol", { class: "v-list" }, value.map((v) => h("li", null, scalar(v))));
    }
    if (value.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
      return table(value, depth);
    }
    return h("ol", { class: "v-list" }, value.map((v) => h("li", null, renderValue(v, depth + 1))));
  }
  const entries = Object.entries(value);
  if (entries.length === 0) return h("span", { class: "v-null" }, "empty");
  return h(
    "dl",
    { class: "v-dl" },
    entries.map(([key, v]) => {
      // Tables and nested objects get the full width, under their label.
      const wide = v && typeof v === "object" && !(Array.isArray(v) && v.every(isPlain));
      return [
        h("dt", { class: wide ? "wide" : null }, humanize(key)),
        h("dd", { class: wide ? "wide" : null }, renderValue(v, depth + 1)),
      ];
    }),
  );
}

function table(rows, depth) {
  const columns = [];
  for (const row of rows) for (const key of Object.keys(row)) if (!columns.includes(key)) columns.push(key);
  return h(
    "div",
    { class: "v-table-wrap" },
    h(
      "table",
      { class: "v-table" },
      h("thead", null, h("tr", null, columns.map((c) => h("th", { scope: "col" }, humanize(c))))),
      h(
        "tbody",
        null,
        rows.map((row) =>
          h(
            "tr",
            null,
            columns.map((c) =>
              h(
                "td",
                {
                  class:
                    typeof row[c] === "number"
                      ? "num"
                      : typeof row[c] === "string" && row[c].length > 40
                        ? "long"
                        : null,
                },
                isPlain(row[c]) || row[c] === undefined ? scalar(row[c]) : renderValue(row[c], depth + 2),
              ),
            ),
          ),
        ),
      ),
    ),
  );
}

/** One line for a step's partial output: "sentences 6 · words 84". */
export function inlineValue(value) {
  if (value === null || value === undefined) return "";
  if (isPlain(value)) return typeof value === "number" ? number(value) : String(value);
  if (Array.isArray(value)) return value.map((v) => (isPlain(v) ? String(v) : JSON.stringify(v))).join(", ");
  return Object.entries(value)
    .map(([k, v]) => `${humanize(k).toLowerCase()}: ${isPlain(v) ? (typeof v === "number" ? number(v) : String(v)) : inlineValue(v)}`)
    .join(" · ");
}

export function rawJson(value) {
  return JSON.stringify(value, null, 2);
}
