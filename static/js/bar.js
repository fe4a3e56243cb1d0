// The progress bar: role="progressbar" with aria-valuenow 0..100; width moves by CSS transition.

import { h } from "./dom.js";

export function createBar(label) {
  const fillEl = h("div", { class: "bar-fill" });
  const el = h(
    "div",
    {
      class: "bar",
      role: "progressbar",
      "aria-valuemin": "0",
      "aria-valuemax": "100",
      "aria-valuenow": "0",
      "aria-label": label,
    },
    fillEl,
  );
  return { el, fillEl };
}

export function updateBar(bar, value, state) {
  const now = String(value);
  if (bar.el.getAttribute("aria-valuenow") !== now) {
    bar.el.setAttribute("aria-valuenow", now);
    bar.el.setAttribute("aria-valuetext", `${value}%`);
    // CSSOM, not a style attribute: allowed under a Content-Security-Policy without 'unsafe-inline'.
    bar.fillEl.style.width = `${value}%`;
  }
  if (bar.el.dataset.state !== state) bar.el.dataset.state = state;
}
