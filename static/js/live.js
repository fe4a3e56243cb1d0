// One EventSource with the reconnect rules of DESIGN.md.
//
// The browser reconnects by itself after a dropped connection and sends Last-Event-ID, so the
// server replays what was missed. When the browser gives up for good (a non-200 answer, e.g. a
// proxy's 502 while the web process restarts), we open a new EventSource ourselves with
// `?after=<last id>`, so the resume still has no gap.

const MAX_BACKOFF_MS = 15_000;

export class LiveStream {
  /**
   * @param {string} url
   * @param {{types: string[], onEvent: Function, onStatus?: Function, onOpen?: Function, cursor?: string|null}} options
   */
  constructor(url, { types, onEvent, onStatus, onOpen, cursor = null }) {
    this.url = url;
    this.types = types;
    this.onEvent = onEvent;
    this.onStatus = onStatus || (() => {});
    this.onOpen = onOpen || (() => {});
    this.cursor = cursor;
    this.source = null;
    this.status = "connecting";
    this.failures = 0;
    this.timer = null;
    this.closed = false;
    this.everOpened = false;
  }

  start() {
    this.closed = false;
    this._open();
    return this;
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.source) this.source.close();
    this.source = null;
    this._setStatus("closed");
  }

  _open() {
    const url = this.cursor ? withParam(this.url, "after", this.cursor) : this.url;
    const source = new EventSource(url);
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
        // The browser will not try again: we do, from our own cursor.
        this.failures += 1;
        const delay = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** Math.min(this.failures - 1, 4));
        clearTimeout(this.timer);
        this.timer = setTimeout(() => {
          if (!this.closed) this._open();
        }, delay * (0.75 + Math.random() * 0.5));
      }
      this._setStatus("reconnecting");
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

export function withParam(url, key, value) {
  const u = new URL(url, location.href);
  u.searchParams.set(key, value);
  return u.pathname + u.search;
}
