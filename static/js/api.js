// JSON over fetch; errors are {"error": {code, message, details}} (docs/http-api.md).
// In production every /api call carries `Authorization: Bearer <API key>`; streams (opened by
// stepstream.js) take a short-lived `?token=` instead.
//
// Paths are relative ("api/jobs"): resolved against the directory stepstream.js is served
// from, so the dashboard works where the app is mounted (`/`, or a prefix such as `/progress/`).

import { resolveBaseUrl } from "../../stepstream.js";

// sessionStorage: the key survives a reload of this tab and is gone when the tab closes; it
// never lands in storage shared by every tab and kept on disk.
const KEY_STORAGE = "stepstream.apiKey";
export const BASE_URL = resolveBaseUrl();

export const auth = {
  get key() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || null;
    } catch {
      return null;
    }
  },
  set(key) {
    sessionStorage.setItem(KEY_STORAGE, key);
  },
  clear() {
    sessionStorage.removeItem(KEY_STORAGE);
  },
  onUnauthorized: null,
};

export class ApiError extends Error {
  constructor(status, body) {
    const error = body?.error || {};
    super(error.message || `request failed with status ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.details = error.details ?? null;
  }
}

export async function api(path, { method = "GET", body, key = auth.key, quiet = false } = {}) {
  const init = { method, headers: { Accept: "application/json" } };
  if (key) init.headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(new URL(path, BASE_URL), init);
  } catch (exc) {
    const error = new ApiError(0, { error: { message: "The server cannot be reached." } });
    error.cause = exc;
    throw error;
  }
  let data = null;
  const text = await response.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401 && !quiet && auth.onUnauthorized) auth.onUnauthorized(error);
    throw error;
  }
  return { status: response.status, data };
}

/**
 * `getToken` for stepstream.js: a stream token from `tokenPath` (POST), asked for only when
 * the stream needs one. Without an API key (development) streams need none.
 */
export function streamToken(tokenPath) {
  return async () => {
    if (!auth.key) return null;
    const { data } = await api(tokenPath, { method: "POST" });
    return data.token;
  };
}
