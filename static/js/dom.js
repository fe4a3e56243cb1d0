// Building DOM nodes safely: every string becomes a text node (textContent), never HTML.
// No innerHTML anywhere in the dashboard; no inline event handler attributes.

const PROPS = new Set(["value", "checked", "disabled", "hidden", "selected", "open", "type", "name", "id"]);

/**
 * h("div", {class: "x", dataset: {id}, on: {click}}, "text", child, [children])
 * Strings and numbers become text nodes. Attribute names starting with "on" are refused.
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  if (props) {
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = String(value);
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key === "on") {
        for (const [type, fn] of Object.entries(value)) el.addEventListener(type, fn);
      } else if (/^on/i.test(key)) {
        throw new Error(`refusing inline handler attribute ${key}`);
      } else if (PROPS.has(key)) el[key] = value;
      else el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

/** Replace an element's children. */
export function fill(el, ...children) {
  clear(el);
  return append(el, children);
}

/** Set text only when it changed (cheap, and keeps selections stable). */
export function setText(el, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (el.textContent !== value) el.textContent = value;
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}
