// A Switchboard client of the public contract only (docs/PROTOCOL.md): HTTP calls under
// /api/v1 and one WebSocket. It keeps the inbox cursor, reconnects with backoff and
// resyncs from the cursor, keeps every send in an outbox until its ack and resends it
// with the same client_msg_id after a reconnect (so nothing is stored twice), batches
// delivered/read marks, throttles typing and renews presence subscriptions.
//
// It touches no DOM: the UI (app.js) listens to its events. Nothing here runs at import,
// so the module also loads in Node (the end-to-end test checks the id functions).

/** An error answer of the HTTP API, or a network failure (status 0). */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * One HTTP call under /api/v1. Returns the parsed JSON body (null for 204); throws an
 * ApiError carrying the contract's `code` and human `message` otherwise.
 */
export async function api(method, path, { token, json, bytes, contentType, headers } = {}) {
  const h = { ...headers };
  if (token) h.Authorization = `Bearer ${token}`;
  let body;
  if (bytes !== undefined) {
    body = bytes;
    h["Content-Type"] = contentType || "application/octet-stream";
  } else if (json !== undefined) {
    body = JSON.stringify(json);
    h["Content-Type"] = "application/json";
  }
  let res;
  try {
    res = await fetch(`/api/v1${path}`, { method, headers: h, body });
  } catch {
    throw new ApiError(0, "network", "Cannot reach the server. Check your connection and try again.");
  }
  if (res.status === 204) return null;
  const text = await res.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = null;
  }
  if (!res.ok) {
    const e = parsed && parsed.error;
    throw new ApiError(
      res.status,
      (e && e.code) || `http_${res.status}`,
      (e && e.message) || `The server answered ${res.status} ${res.statusText}.`,
    );
  }
  return parsed;
}

/** A fresh random UUIDv4 (crypto.randomUUID needs a secure context; this does not). */
export function uuid4() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  return bytesToUuid(b);
}

function uuidBytes(s) {
  const hex = s.replace(/-/g, "");
  const b = new Uint8Array(16);
  for (let i = 0; i < 16; i++) b[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return b;
}

function bytesToUuid(b) {
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** SHA-1 of bytes (crypto.subtle is async and needs a secure context; ids need neither). */
function sha1(data) {
  const words = ((data.length + 8) >> 6) + 1;
  const w = new Uint32Array(words * 16);
  for (let i = 0; i < data.length; i++) w[i >> 2] |= data[i] << (24 - (i % 4) * 8);
  w[data.length >> 2] |= 0x80 << (24 - (data.length % 4) * 8);
  w[words * 16 - 1] = data.length * 8;
  let [h0, h1, h2, h3, h4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0];
  const x = new Uint32Array(80);
  const rol = (v, n) => (v << n) | (v >>> (32 - n));
  for (let off = 0; off < w.length; off += 16) {
    for (let i = 0; i < 16; i++) x[i] = w[off + i];
    for (let i = 16; i < 80; i++) x[i] = rol(x[i - 3] ^ x[i - 8] ^ x[i - 14] ^ x[i - 16], 1);
    let [a, b, c, d, e] = [h0, h1, h2, h3, h4];
    for (let i = 0; i < 80; i++) {
      const [f, k] =
        i < 20 ? [(b & c) | (~b & d), 0x5a827999]
        : i < 40 ? [b ^ c ^ d, 0x6ed9eba1]
        : i < 60 ? [(b & c) | (b & d) | (c & d), 0x8f1bbcdc]
        : [b ^ c ^ d, 0xca62c1d6];
      const t = (rol(a, 5) + f + e + k + x[i]) >>> 0;
      [e, d, c, b, a] = [d, c, rol(b, 30) >>> 0, a, t];
    }
    h0 = (h0 + a) >>> 0;
    h1 = (h1 + b) >>> 0;
    h2 = (h2 + c) >>> 0;
    h3 = (h3 + d) >>> 0;
    h4 = (h4 + e) >>> 0;
  }
  const out = new Uint8Array(20);
  [h0, h1, h2, h3, h4].forEach((h, i) => new DataView(out.buffer).setUint32(4 * i, h));
  return out;
}

/**
 * The direct conversation id of two users (PROTOCOL.md section 5): UUIDv5 in the URL
 * namespace of the two ids' 16 bytes each, in ascending byte order.
 */
export function directConversationId(a, b) {
  const [x, y] = [uuidBytes(a), uuidBytes(b)];
  let cmp = 0;
  for (let i = 0; i < 16 && cmp === 0; i++) cmp = x[i] - y[i];
  const [lo, hi] = cmp <= 0 ? [x, y] : [y, x];
  const name = new Uint8Array(48);
  name.set(uuidBytes("6ba7b811-9dad-11d1-80b4-00c04fd430c8"), 0);
  name.set(lo, 16);
  name.set(hi, 32);
  const u = sha1(name).slice(0, 16);
  u[6] = (u[6] & 0x0f) | 0x50;
  u[8] = (u[8] & 0x3f) | 0x80;
  return bytesToUuid(u);
}

/** A `sync` cursor past any inbox: the server answers `synced` with its head (rule 7.4.4). */
const HEAD = Number.MAX_SAFE_INTEGER;
/** Reconnect delays: first, doubling up to the last; each with +-20% jitter. */
const RECONNECT_FIRST_MS = 500;
const RECONNECT_MAX_MS = 15000;
/** An app-level ping when nothing came for this long; the socket is dropped past the limit. */
const IDLE_PING_MS = 5000;
const SILENCE_LIMIT_MS = 12000;
/** Marks are sent at most this often, for at most this many conversations at a time
 *  (the server refuses more than 32 per 100 ms). */
const MARK_WINDOW_MS = 150;
const MARKS_PER_WINDOW = 30;
const TYPING_EVERY_MS = 2500;
/** Send errors worth retrying by themselves (with the same client_msg_id), and how often. */
const RETRYABLE = new Set(["rate_limited", "owner_unavailable", "storage_error", "internal"]);
const MAX_AUTO_RETRIES = 6;

/**
 * A signed-in user's connection. Events (CustomEvent, fields in `detail`):
 * - `status` {state: "connecting" | "online" | "offline", retryInMs?}
 * - `synced` {first, inboxSeq}: replay done; `first` on the first sync of this page,
 *   whose cursor is the inbox head (the page loads the state before it over HTTP)
 * - `message` {message, inboxSeq}; `ack` {ack, entry}; `outbox` {entry} (a send's state
 *   changed: "uploading" | "pending" | "failed", or removed when `entry.done`)
 * - `receipt`, `presence`, `typing`: the server's frames as they are
 * - `servererror` {code, message}: an error frame not about a send
 * - `revoked` {message}: the token no longer works; sign in again
 */
export class Client extends EventTarget {
  constructor({ token, userId }) {
    super();
    this.token = token;
    this.userId = userId;
    /** Highest inbox_seq applied; null until the first `synced`. */
    this.cursor = null;
    this.ws = null;
    this.live = false;
    this.stopped = true;
    this.attempt = 0;
    this.timer = null;
    this.lastRx = 0;
    /** client_msg_id -> entry, in creation order. */
    this.outbox = new Map();
    this.watched = new Set();
    this.wantMarks = new Map();
    this.sentMarks = new Map();
    this.markTimer = null;
    this.typingAt = new Map();
    this.storeKey = `switchboard.outbox.${userId}`;
    this.restoreOutbox();
    // Back online: try at once, dropping an attempt that was made while offline.
    this.onOnline = () => {
      if (this.stopped || (this.ws && this.ws.readyState === WebSocket.OPEN)) return;
      this.attempt = 0;
      const stale = this.detach();
      if (stale) stale.close();
      this.connect();
    };
    this.onOffline = () => this.drop("offline");
  }

  emit(type, detail = {}) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** An authenticated HTTP call; a 401 means the session is over. */
  async call(method, path, opts = {}) {
    try {
      return await api(method, path, { ...opts, token: this.token });
    } catch (e) {
      if (e.status === 401) this.revoke(e.message);
      throw e;
    }
  }

  /** GET /media/{id} with the token (an <img> cannot send it): the raw Response. */
  async fetchMedia(id, range) {
    const headers = { Authorization: `Bearer ${this.token}` };
    if (range) headers.Range = range;
    let res;
    try {
      res = await fetch(`/api/v1/media/${id}`, { headers });
    } catch {
      throw new ApiError(0, "network", "Cannot reach the server. Check your connection and try again.");
    }
    if (res.status === 401) this.revoke();
    if (!res.ok && res.status !== 206 && res.status !== 416) {
      let message = `The server answered ${res.status}.`;
      try {
        message = (await res.json()).error.message;
      } catch {
        /* keep the status text */
      }
      throw new ApiError(res.status, "media", message);
    }
    return res;
  }

  start() {
    this.stopped = false;
    globalThis.addEventListener?.("online", this.onOnline);
    globalThis.addEventListener?.("offline", this.onOffline);
    this.pulse = setInterval(() => this.checkAlive(), 1000);
    this.connect();
  }

  stop() {
    this.stopped = true;
    globalThis.removeEventListener?.("online", this.onOnline);
    globalThis.removeEventListener?.("offline", this.onOffline);
    clearInterval(this.pulse);
    clearTimeout(this.timer);
    clearTimeout(this.markTimer);
    const ws = this.ws;
    this.detach();
    if (ws) ws.close(1000, "bye");
  }

  revoke(message) {
    if (this.stopped) return;
    this.stop();
    this.emit("revoked", { message: message || "Your session has ended. Please log in again." });
  }

  connect() {
    clearTimeout(this.timer);
    if (this.stopped || this.ws) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/api/v1/ws?token=${encodeURIComponent(this.token)}`);
    this.ws = ws;
    this.live = false;
    this.lastRx = Date.now();
    let opened = false;
    this.emit("status", { state: "connecting" });
    ws.onopen = () => {
      opened = true;
      this.lastRx = Date.now();
      this.raw({ type: "sync", after: this.cursor ?? HEAD });
      // Sends may precede `synced`; unacked ones go again with their own ids.
      for (const entry of this.outbox.values()) if (entry.state === "pending") this.transmit(entry);
      if (this.watched.size) this.raw({ type: "subscribe_presence", user_ids: [...this.watched] });
    };
    ws.onmessage = (ev) => {
      this.lastRx = Date.now();
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        this.emit("servererror", { code: "bad_frame", message: "The server sent something unreadable." });
        return;
      }
      this.onFrame(frame);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.detach();
      if (ev.code === 1008) return this.revoke("You were logged out. Please log in again.");
      if (!opened) {
        // An upgrade refused before opening tells the page nothing: ask whether the
        // token still works, which revokes the session if it does not.
        this.call("GET", "/users/me").catch(() => {});
      }
      this.scheduleReconnect();
    };
  }

  /** Forgets the socket at once (its close may take long on a dead network). */
  detach() {
    const ws = this.ws;
    this.ws = null;
    this.live = false;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    return ws;
  }

  drop(reason) {
    const ws = this.detach();
    if (!ws) return;
    try {
      ws.close(4000, reason);
    } catch {
      /* already closing */
    }
    this.scheduleReconnect();
  }

  scheduleReconnect() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    const base = Math.min(RECONNECT_MAX_MS, RECONNECT_FIRST_MS * 2 ** this.attempt);
    const delay = Math.round(base * (0.8 + 0.4 * Math.random()));
    this.attempt++;
    this.retryAt = Date.now() + delay;
    this.emit("status", { state: "offline", retryInMs: delay });
    this.timer = setTimeout(() => this.connect(), delay);
  }

  /** Reconnects now (the person asked to). */
  reconnectNow() {
    this.attempt = 0;
    if (!this.ws) this.connect();
  }

  checkAlive() {
    if (!this.ws) return;
    const quiet = Date.now() - this.lastRx;
    if (this.ws.readyState === WebSocket.CONNECTING && quiet > SILENCE_LIMIT_MS) return this.drop("connect timeout");
    if (this.ws.readyState !== WebSocket.OPEN) return;
    if (quiet > SILENCE_LIMIT_MS) this.drop("silent");
    else if (quiet > IDLE_PING_MS && (!this.pingAt || Date.now() - this.pingAt > IDLE_PING_MS)) {
      this.pingAt = Date.now();
      this.raw({ type: "ping" });
    }
  }

  raw(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  onFrame(f) {
    switch (f.type) {
      case "message": {
        this.cursor = f.inbox_seq;
        const m = f.message;
        if (m.sender_id === this.userId && this.outbox.has(m.client_msg_id)) {
          this.finish(this.outbox.get(m.client_msg_id));
        }
        this.emit("message", { message: m, inboxSeq: f.inbox_seq });
        break;
      }
      case "ack": {
        const entry = this.outbox.get(f.client_msg_id);
        if (entry) this.finish(entry);
        this.emit("ack", { ack: f, entry });
        break;
      }
      case "synced": {
        const first = this.cursor === null;
        // A cursor past the server's head restarts at the head (rule 7.4.4).
        this.cursor = f.inbox_seq;
        this.live = true;
        this.attempt = 0;
        this.emit("status", { state: "online" });
        this.emit("synced", { first, inboxSeq: f.inbox_seq });
        // Marks sent on a connection that died may not have been applied: send again.
        this.sentMarks.clear();
        this.flushMarks();
        break;
      }
      case "error":
        if (f.client_msg_id && this.outbox.has(f.client_msg_id)) {
          this.sendFailed(this.outbox.get(f.client_msg_id), f);
        } else {
          this.emit("servererror", { code: f.code, message: f.message });
        }
        break;
      case "receipt":
      case "presence":
      case "typing":
        this.emit(f.type, f);
        break;
      default:
        // pong, and frame types of later releases.
        break;
    }
  }

  // ---------------------------------------------------------------- outbox

  /**
   * Queues a message: `toUser` (a direct chat, created on first use) or `conversationId`,
   * with `body`, and optionally a `file` uploaded first. `cid` is the conversation the UI
   * shows it in. The entry stays until acked; its state goes out as `outbox` events.
   */
  send({ toUser, conversationId, cid, body, file }) {
    const entry = {
      cmid: uuid4(),
      toUser,
      conversationId,
      cid,
      body,
      media: [],
      file,
      fileInfo: file ? { name: file.name, size: file.size, type: file.type || "application/octet-stream" } : null,
      state: file ? "uploading" : "pending",
      error: null,
      tries: 0,
      createdAt: Date.now(),
    };
    this.outbox.set(entry.cmid, entry);
    this.changed(entry);
    if (file) this.upload(entry);
    else this.transmit(entry);
    return entry;
  }

  async upload(entry) {
    entry.state = "uploading";
    entry.error = null;
    this.changed(entry);
    try {
      const media = await this.call("POST", "/media", { bytes: entry.file, contentType: entry.fileInfo.type });
      entry.media = [media.media_id];
      entry.mediaInfo = media;
      entry.state = "pending";
      this.changed(entry);
      this.transmit(entry);
    } catch (e) {
      entry.state = "failed";
      entry.error = `Upload failed: ${e.message}`;
      this.changed(entry);
    }
  }

  transmit(entry) {
    const frame = { type: "send", client_msg_id: entry.cmid, body: entry.body };
    if (entry.toUser) frame.to_user = entry.toUser;
    else frame.conversation_id = entry.conversationId;
    if (entry.media.length) frame.media = entry.media;
    // Not connected: the next connection sends it (see onopen).
    this.raw(frame);
  }

  /** Tries a failed send again, with the same client_msg_id. */
  retry(cmid) {
    const entry = this.outbox.get(cmid);
    if (!entry || entry.state !== "failed") return;
    entry.tries = 0;
    if (entry.file && !entry.media.length) return this.upload(entry);
    entry.state = "pending";
    entry.error = null;
    this.changed(entry);
    this.transmit(entry);
  }

  /** Gives up a failed send. */
  discard(cmid) {
    const entry = this.outbox.get(cmid);
    if (!entry || entry.state !== "failed") return;
    this.finish(entry);
  }

  sendFailed(entry, f) {
    if (RETRYABLE.has(f.code) && entry.tries < MAX_AUTO_RETRIES) {
      entry.tries++;
      entry.error = `${f.message} (trying again)`;
      this.changed(entry);
      setTimeout(() => {
        if (this.outbox.get(entry.cmid) === entry && entry.state === "pending") this.transmit(entry);
      }, 500 * 2 ** entry.tries);
      return;
    }
    entry.state = "failed";
    entry.error = f.message;
    this.changed(entry);
  }

  finish(entry) {
    this.outbox.delete(entry.cmid);
    entry.done = true;
    this.changed(entry);
  }

  changed(entry) {
    this.saveOutbox();
    this.emit("outbox", { entry });
  }

  /** Unacked sends survive a reload of this tab (not uploads still in progress). */
  saveOutbox() {
    try {
      const keep = [...this.outbox.values()]
        .filter((e) => e.state !== "uploading")
        .map(({ file, ...rest }) => rest);
      sessionStorage.setItem(this.storeKey, JSON.stringify(keep));
    } catch {
      /* storage unavailable: the outbox lives as long as the page */
    }
  }

  restoreOutbox() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(this.storeKey) || "[]");
      for (const e of saved) this.outbox.set(e.cmid, { ...e, file: null });
    } catch {
      /* nothing saved */
    }
  }

  // ---------------------------------------------------------------- marks, typing, presence

  /** Raises this user's `delivered` or `read` watermark of `cid` to `seq` (batched). */
  mark(cid, kind, seq) {
    const w = this.wantMarks.get(cid) || { delivered: 0, read: 0 };
    w[kind] = Math.max(w[kind], seq);
    if (kind === "read") w.delivered = Math.max(w.delivered, seq);
    this.wantMarks.set(cid, w);
    if (!this.markTimer) this.markTimer = setTimeout(() => this.flushMarks(), MARK_WINDOW_MS);
  }

  flushMarks() {
    clearTimeout(this.markTimer);
    this.markTimer = null;
    if (!this.live) return; // the next `synced` flushes
    let sent = 0;
    let more = false;
    for (const [cid, want] of this.wantMarks) {
      const had = this.sentMarks.get(cid) || { delivered: 0, read: 0 };
      const type = want.read > had.read ? "read" : want.delivered > had.delivered ? "delivered" : null;
      if (!type) continue;
      if (sent === MARKS_PER_WINDOW) {
        more = true;
        break;
      }
      // A read raises delivery too, so one frame does for both.
      this.raw({ type, conversation_id: cid, seq: want[type] });
      this.sentMarks.set(cid, { ...want });
      sent++;
    }
    if (more) this.markTimer = setTimeout(() => this.flushMarks(), MARK_WINDOW_MS);
  }

  typing(cid) {
    const now = Date.now();
    if (!this.live || now - (this.typingAt.get(cid) || 0) < TYPING_EVERY_MS) return;
    this.typingAt.set(cid, now);
    this.raw({ type: "typing", conversation_id: cid });
  }

  /** Follows these users' presence, now and on every later connection. */
  watchPresence(ids) {
    const fresh = ids.filter((id) => !this.watched.has(id));
    if (!fresh.length) return;
    fresh.forEach((id) => this.watched.add(id));
    this.raw({ type: "subscribe_presence", user_ids: fresh });
  }
}
