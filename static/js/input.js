// Human input in the job view: the form a waiting job asks for, built from the JSON Schema of
// its `waiting_for` (booleans as checkboxes, strings as text, numbers), and the inputs given,
// with who gave them and when.

import { h, clear, fill } from "./dom.js";
import { dateTime, humanize } from "./format.js";

/** The section's content for `record`; `submit(name, value)` resolves or throws an ApiError. */
export class InputSection {
  constructor(el, submit) {
    this.el = el;
    this.submit = submit;
    this.key = undefined;
  }

  render(record) {
    const request = record.state === "waiting" ? record.waiting_for : null;
    const answers = Object.entries(record.answers || {});
    const key = JSON.stringify([record.id, request, answers]);
    if (key === this.key) return; // rebuilt only when it changes: typing is never lost
    this.key = key;
    this.el.hidden = !request && answers.length === 0;
    if (this.el.hidden) return clear(this.el);
    fill(
      this.el,
      h("h3", { id: "input-title" }, request ? "Waiting for input" : "Input given"),
      request ? this._form(request) : null,
      answers.length ? h("ul", { class: "answers" }, answers.map(([name, a]) => answerLine(name, a))) : null,
    );
  }

  _form(request) {
    const schema = request.schema || {};
    const required = new Set(schema.required || []);
    const fields = Object.entries(schema.properties || {}).map(([name, prop]) =>
      field(name, resolve(prop, schema), required.has(name)),
    );
    const errors = h("ul", { class: "form-errors", role: "alert", hidden: true });
    const button = h("button", { type: "submit", class: "btn btn-primary" }, "Send");
    const form = h(
      "form",
      {
        class: "input-form",
        "data-input": request.name,
        novalidate: true,
        on: {
          submit: async (event) => {
            event.preventDefault();
            button.disabled = true;
            errors.hidden = true;
            const value = Object.fromEntries(fields.map((f) => [f.name, f.read()]).filter(([, v]) => v !== undefined));
            try {
              await this.submit(request.name, value);
            } catch (error) {
              const details = Array.isArray(error.details) ? error.details : [];
              const lines = details.length
                ? details.map((d) => `${(d.loc || []).join(".") || "value"}: ${d.msg}`)
                : [error.message];
              fill(errors, lines.map((line) => h("li", null, line)));
              errors.hidden = false;
              button.disabled = false;
            }
          },
        },
      },
      request.prompt ? h("p", { class: "input-prompt" }, request.prompt) : null,
      fields.map((f) => f.el),
      request.timeout_at
        ? h("p", { class: "muted" }, `Unanswered by ${dateTime(request.timeout_at)}, ${request.default != null ? "the default applies" : "the job fails"}.`)
        : null,
      errors,
      h("div", { class: "form-actions" }, button),
    );
    return form;
  }
}

function answerLine(name, answer) {
  return h(
    "li",
    { class: "answer", "data-input": name },
    h("span", { class: "answer-name" }, humanize(name)),
    h("span", { class: "answer-value" }, JSON.stringify(answer.value)),
    h("span", { class: "muted answer-by" }, `by ${answer.by} · ${dateTime(answer.at)}`),
  );
}

function resolve(prop, root) {
  if (!prop?.$ref) return prop || {};
  let target = root;
  for (const part of prop.$ref.replace(/^#\//, "").split("/")) target = target?.[part];
  return { ...(target || {}), ...prop };
}

/** One labelled control and how to read its value (undefined: left out of the value). */
function field(name, schema, required) {
  const id = `input-${name}`;
  const label = schema.title || humanize(name);
  let control;
  let read;
  if (schema.type === "boolean") {
    control = h("input", { id, name, type: "checkbox", checked: schema.default === true });
    read = () => control.checked;
  } else if (schema.type === "integer" || schema.type === "number") {
    control = h("input", { id, name, type: "number", step: schema.type === "integer" ? "1" : "any", value: schema.default ?? "" });
    read = () => (control.value === "" ? undefined : Number(control.value));
  } else if (schema.type === "string") {
    control = h("input", { id, name, type: "text", value: schema.default ?? "" });
    read = () => (control.value === "" && !required ? undefined : control.value);
  } else {
    control = h("textarea", { id, name, rows: 3, placeholder: "JSON" });
    read = () => {
      if (control.value.trim() === "") return undefined;
      try {
        return JSON.parse(control.value);
      } catch {
        return control.value; // the server names what does not fit
      }
    };
  }
  const help = schema.description ? h("p", { class: "help", id: `${id}-help` }, schema.description) : null;
  if (help) control.setAttribute("aria-describedby", `${id}-help`);
  const el =
    schema.type === "boolean"
      ? h("div", { class: "field field-check" }, h("label", { for: id }, control, ` ${label}`), help)
      : h("div", { class: "field" }, h("label", { for: id }, `${label}${required ? " *" : ""}`), control, help);
  return { name, el, read };
}
