// One EventSource with the reconnect rules of DESIGN.md.
//
// The browser reconnects by itself after a dropped connection and sends Last-Event-ID, so the
// server replays what was missed. When the browser gives up for good (a non-200 answer: a
// proxy's 502 while the web process restarts, a 429, a 401 for an expired stream token) we open
// a new EventSource ourselves with `?after=<last id>` (and a fresh token), so the resume still
// has no gap.

const MAX_BACKOFF_MS = 15_000;

export class LiveStream {
  /**
   * @param {string} url
   * @param {{types: string[], onEvent: Function, onStatus?: Function, onOpen?: Function,
   *          cursor?: string|null, token?: (force: boolean) => Promise<string|null>}} options
   */
  constructor(url, { types, onEvent, onStatus, onOpen, cursor = null, token = null }) {
    this.url = url;
    this.types = types;
    this.onEvent = onEvent;
    this.onStatus = onStatus || (() => {});
    this.onOpen = onOpen || (() => {});
    this.cursor = cursor;
    this.token = token;
    this.freshToken = false;
    this.source = null;
    this.status = "connecting";
    this.failures = 0;
    this.timer = null;
    this.closed = false;
    this.everOpened = false;
    this.generation = 0;
  }

  start() {
    this.closed = false;
    this._open();
    return this;
  }

  close() {
    this.closed = true;
    this.generation += 1;
    clearTimeout(this.timer);
    if (this.source) this.source.close();
    this.source = null;
    this._setStatus("closed");
  }

  _retryLater() {
    this.failures += 1;
    this.freshToken = true;
    const delay = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** Math.min(this.failures - 1, 4));
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      if (!this.closed) this._open();
    }, delay * (0.75 + Math.random() * 0.5));
    this._setStatus("reconnecting");
  }

  async _open() {
    const generation = ++this.generation;
    if (this.source) this.source.close();
    this.source = null;
    let token = null;
    if (this.token) {
      try {
        token = await this.token(this.freshToken);
        this.freshToken = false;
      } catch {
        if (generation === this.generation && !this.closed) this._retryLater();
        return;
      }
    }
    if (generation !== this.generation || this.closed) return;
    const params = {};
    if (this.cursor) params.after = this.cursor;
    if (token) params.token = token;
    const source = new EventSource(withParams(this.url, params));
    this.source = source;
    source.addEventListener("open", () => {
      if (this.source !== source) return;
      this.failures = 0;
      this.everOpened = true;
      this._setStatus("live");
      this.onOpen();
    });
    source.addEventListener("error", () => {
      if (this.source !== source || this.closed) return;
      if (source.readyState === EventSource.CLOSED) {
        this._retryLater(); // the browser will not try again: we do, from our own cursor
      } else {
        this._setStatus("reconnecting");
      }
    });
    source.addEventListener("token_expired", () => {
      if (this.source !== source) return;
      this.freshToken = true;
      this._open(); // at once, from our cursor, with a new token
    });
    for (const type of this.types) {
      source.addEventListener(type, (message) => {
        if (this.source !== source) return;
        if (message.lastEventId) this.cursor = message.lastEventId;
        let data;
        try {
          data = JSON.parse(message.data);
        } catch {
          return; // not ours: the server only sends JSON objects
        }
        this.onEvent(type, data, message.lastEventId || null);
      });
    }
  }

  _setStatus(status) {
    if (status === this.status) return;
    this.status = status;
    this.onStatus(status);
  }
}

export function withParams(url, params) {
  const u = new URL(url, location.href);
  for (const [key, value] of Object.entries(params)) u.searchParams.set(key, value);
  return u.pathname + u.search;
}
