// A form built from a task's input schema (pydantic's JSON Schema: $defs/$ref, anyOf with null
// for optional fields, enums from Literal, arrays of objects).

import { h, clear, fill } from "./dom.js";
import { humanize } from "./format.js";

const TEXTAREA_MIN_LENGTH = 300;
const LONG_TEXT_NAMES = new Set(["text", "body", "prompt", "content", "document"]);

function resolve(schema, root) {
  let current = schema || {};
  for (let guard = 0; current.$ref && guard < 10; guard++) {
    const path = current.$ref.replace(/^#\//, "").split("/");
    let target = root;
    for (const part of path) target = target?.[part];
    const { $ref, ...rest } = current;
    current = { ...(target || {}), ...rest };
  }
  return current;
}

/** The field's shape: nullable optional fields are anyOf [X, null]. */
function describe(name, raw, root, required) {
  let schema = resolve(raw, root);
  let nullable = false;
  const variants = schema.anyOf || schema.oneOf;
  if (variants) {
    const nonNull = variants.filter((v) => v.type !== "null");
    nullable = nonNull.length < variants.length;
    if (nonNull.length === 1) {
      const { anyOf, oneOf, ...rest } = schema;
      schema = { ...resolve(nonNull[0], root), ...rest };
    }
  }
  let kind = "json";
  if (Array.isArray(schema.enum)) kind = "enum";
  else if (schema.const !== undefined) kind = "enum";
  else if (schema.type === "boolean") kind = "boolean";
  else if (schema.type === "integer") kind = "integer";
  else if (schema.type === "number") kind = "number";
  else if (schema.type === "string") {
    const long = schema.maxLength > TEXTAREA_MIN_LENGTH || LONG_TEXT_NAMES.has(name);
    kind = long ? "textarea" : "string";
  }
  return {
    name,
    schema,
    kind,
    nullable,
    required,
    label: schema.title || humanize(name),
    help: schema.description || "",
  };
}

function jsonHint(field, root) {
  const schema = field.schema;
  if (schema.type === "array") {
    const items = resolve(schema.items, root);
    if (items.type === "object" && items.properties) {
      const need = new Set(items.required || []);
      const parts = Object.entries(items.properties).map(([key, prop]) => {
        const p = resolve(prop, root);
        const choices = Array.isArray(p.enum) ? ` (${p.enum.join(" | ")})` : "";
        return `${key}${need.has(key) ? "*" : ""}${choices}`;
      });
      return `A JSON list of objects with ${parts.join(", ")}. * = required.`;
    }
    return "A JSON list.";
  }
  return "JSON.";
}

export class TaskForm {
  constructor({ fieldsEl, errorsEl }) {
    this.fieldsEl = fieldsEl;
    this.errorsEl = errorsEl;
    this.task = null;
    this.fields = [];
  }

  build(task) {
    this.task = task;
    const root = task.input_schema || {};
    const required = new Set(root.required || []);
    const props = Object.entries(root.properties || {});
    const sample = task.sample_input || {};
    const all = props.map(([name, raw]) => describe(name, raw, root, required.has(name)));
    // Required fields first, then those the sample uses, then the rest behind "More options".
    const main = [
      ...all.filter((f) => f.required),
      ...all.filter((f) => !f.required && f.name in sample),
    ];
    const more = all.filter((f) => !main.includes(f));
    this.fields = [];
    clear(this.fieldsEl);
    this.clearErrors();
    for (const field of main) this.fieldsEl.appendChild(this._field(field, root));
    if (more.length) {
      const details = h(
        "details",
        { class: "more-options" },
        h("summary", null, `More options (${more.length})`),
      );
      for (const field of more) details.appendChild(this._field(field, root));
      this.fieldsEl.appendChild(details);
      this.moreEl = details;
    } else this.moreEl = null;
  }

  _field(field, root) {
    const id = `f-${field.name}`;
    const errorId = `${id}-error`;
    const helpId = `${id}-help`;
    const schema = field.schema;
    let input;
    if (field.kind === "enum") {
      const options = Array.isArray(schema.enum) ? schema.enum : [schema.const];
      input = h(
        "select",
        { id, name: field.name },
        !field.required && schema.default === undefined ? h("option", { value: "" }, "—") : null,
        field.nullable ? h("option", { value: "" }, "none") : null,
        options.map((o) => h("option", { value: String(o) }, String(o))),
      );
    } else if (field.kind === "boolean") {
      input = h("input", { id, name: field.name, type: "checkbox" });
    } else if (field.kind === "integer" || field.kind === "number") {
      input = h("input", {
        id,
        name: field.name,
        type: "number",
        inputmode: field.kind === "integer" ? "numeric" : "decimal",
        step: field.kind === "integer" ? "1" : "any",
        min: schema.minimum ?? null,
        max: schema.maximum ?? null,
      });
    } else if (field.kind === "string") {
      input = h("input", { id, name: field.name, type: "text", maxlength: schema.maxLength ?? null, autocomplete: "off" });
    } else if (field.kind === "textarea") {
      input = h("textarea", { id, name: field.name, rows: "5", spellcheck: "true" });
    } else {
      input = h("textarea", { id, name: field.name, rows: "6", class: "json", spellcheck: "false" });
    }
    input.setAttribute("aria-describedby", `${helpId} ${errorId}`);
    if (field.required) input.setAttribute("aria-required", "true");
    const helpText = field.kind === "json" ? [field.help, jsonHint(field, root)].filter(Boolean).join(" ") : field.help;
    const wrapper = h(
      "div",
      { class: `field field-${field.kind}`, dataset: { field: field.name } },
      field.kind === "boolean"
        ? h("label", { class: "check", for: id }, input, " ", field.label)
        : h("label", { for: id }, field.label, field.required ? h("span", { class: "req", "aria-hidden": "true" }, " *") : null),
      field.kind === "boolean" ? null : input,
      h("p", { class: "help", id: helpId }, helpText),
      h("p", { class: "field-error", id: errorId, hidden: true }),
    );
    const entry = { ...field, input, wrapper, errorEl: wrapper.querySelector(".field-error") };
    this.fields.push(entry);
    this._set(entry, schema.default);
    return wrapper;
  }

  _set(field, value) {
    const { input, kind } = field;
    if (kind === "boolean") input.checked = Boolean(value);
    else if (kind === "json") input.value = value === undefined || value === null ? "" : JSON.stringify(value, null, 2);
    else input.value = value === undefined || value === null ? "" : String(value);
  }

  fillSample() {
    const sample = this.task?.sample_input || {};
    for (const field of this.fields) {
      const value = field.name in sample ? sample[field.name] : field.schema.default;
      this._set(field, value);
    }
    this.clearErrors();
  }

  /** {input} or {errors: [{field, message}]} when a value cannot even be read. */
  read() {
    const input = {};
    const errors = [];
    for (const field of this.fields) {
      const { input: el, kind, name } = field;
      if (kind === "boolean") {
        input[name] = el.checked;
        continue;
      }
      const raw = el.value;
      if (raw.trim() === "") {
        if (kind === "textarea" || kind === "string") {
          if (field.required) input[name] = raw; // the server says why an empty text is wrong
        }
        continue; // optional: the task's default applies
      }
      if (kind === "integer" || kind === "number") {
        const value = Number(raw);
        if (!Number.isFinite(value)) errors.push({ field: name, message: "Enter a number." });
        else if (kind === "integer" && !Number.isInteger(value)) errors.push({ field: name, message: "Enter a whole number." });
        else input[name] = value;
      } else if (kind === "json") {
        try {
          input[name] = JSON.parse(raw);
        } catch (exc) {
          errors.push({ field: name, message: `This is not valid JSON: ${exc.message}` });
        }
      } else input[name] = raw;
    }
    return errors.length ? { errors } : { input };
  }

  clearErrors() {
    this.errorsEl.hidden = true;
    clear(this.errorsEl);
    for (const field of this.fields) {
      field.errorEl.hidden = true;
      field.errorEl.textContent = "";
      field.input.removeAttribute("aria-invalid");
      field.wrapper.classList.remove("invalid");
    }
  }

  /** Show an error next to the form: a summary, and each field's own message under it. */
  showErrors(message, items, extra = []) {
    this.clearErrors();
    const lines = [];
    for (const item of items) {
      const field = this.fields.find((f) => f.name === item.field);
      const where = [field ? field.label : item.field ? humanize(item.field) : null, ...(item.path || [])]
        .filter(Boolean)
        .join(" › ");
      lines.push(where ? `${where}: ${item.message}` : item.message);
      if (field) {
        const previous = field.errorEl.textContent;
        const own = [item.path?.length ? `${item.path.join(" › ")}: ` : "", item.message].join("");
        field.errorEl.textContent = previous ? `${previous} ${own}` : own;
        field.errorEl.hidden = false;
        field.input.setAttribute("aria-invalid", "true");
        field.wrapper.classList.add("invalid");
        if (this.moreEl && this.moreEl.contains(field.wrapper)) this.moreEl.open = true;
      }
    }
    const title = message ? message.charAt(0).toUpperCase() + message.slice(1) : "";
    fill(
      this.errorsEl,
      h("p", { class: "form-errors-title" }, title),
      lines.length || extra.length
        ? h("ul", null, [...lines, ...extra].map((line) => h("li", null, line)))
        : null,
    );
    this.errorsEl.hidden = false;
  }

  /** A 422 from the server: {code, message, details}. */
  showApiError(error) {
    const details = error.details;
    const items = [];
    const extra = [];
    if (Array.isArray(details)) {
      for (const d of details) {
        const loc = Array.isArray(d.loc) ? d.loc : [];
        const path = loc.slice(1).map((p) => (typeof p === "number" ? `item ${p + 1}` : humanize(p)));
        items.push({ field: loc.length ? String(loc[0]) : null, path, message: d.msg || String(d) });
      }
    } else if (details && typeof details === "object") {
      for (const [key, value] of Object.entries(details)) {
        extra.push(`${humanize(key)}: ${Array.isArray(value) ? value.join(", ") : JSON.stringify(value)}`);
      }
    }
    this.showErrors(error.message || "The job could not be started.", items, extra);
  }
}
