// The Switchboard web app: sign-in, the conversation list, the chat view, groups and
// media, drawn with plain DOM calls from the state below. Everything it knows comes
// through client.js, that is, through the public contract only.
//
// Start-up: the socket syncs first (learning the inbox head), then the conversations and
// their last messages are read over HTTP; live events after the head come over the
// socket and are applied by seq, so anything seen both ways counts once.

import { api, Client, directConversationId } from "./client.js";

const SESSION_KEY = "switchboard.session";
const GROUP_NAMES_KEY = "switchboard.groupNames";
/** cid -> {name, last}: what this device knew of groups the user is no longer in. */
const FORMER_KEY = "switchboard.formerGroups";
const PAGE = 50;
const TYPING_SHOWN_MS = 4000;
const INLINE_IMAGE_MAX_BYTES = 16 * 1024 * 1024;

const $ = (id) => document.getElementById(id);

/** Builds an element: attributes (`on*` functions become listeners), then children. */
/** Small line icons (emoji fonts are not everywhere). */
const ICONS = {
  clip: "M16.5 6.5 8.6 14.4a2 2 0 0 0 2.8 2.8l7.9-7.9a4 4 0 0 0-5.7-5.7L5.7 11.5a6 6 0 0 0 8.5 8.5l6.3-6.3",
  clock: "M12 3a9 9 0 1 0 0 18 9 9 0 0 0 0-18zm0 4v5l3 2",
  file: "M14 3H7a2 2 0 0 0-2 2v14a2 2 0 0 0 2 2h10a2 2 0 0 0 2-2V8zm0 0v5h5",
  up: "M12 19V5m-6 6 6-6 6 6",
};

function icon(name) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", `icon icon-${name}`);
  svg.setAttribute("aria-hidden", "true");
  const p = document.createElementNS(ns, "path");
  p.setAttribute("d", ICONS[name]);
  svg.append(p);
  return svg;
}

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

// ------------------------------------------------------------------ state

let client = null;
let me = null;
let channel = null;
/** cid -> conversation (see newConversation). */
const convs = new Map();
/** user_id -> user object (with live presence). */
const users = new Map();
const userLoads = new Map();
/** cid -> Map(user_id -> until ms). */
const typing = new Map();
/** media_id -> Promise of {type, size, url?}. */
const mediaInfo = new Map();
/** client_msg_id -> object URL of a file being sent (its preview). */
const previews = new Map();
let openCid = null;
let loading = false;

function newConversation(cid) {
  return {
    cid,
    kind: null,
    peerId: null,
    groupId: null,
    lastSeq: 0,
    readSeq: 0,
    deliveredSeq: 0,
    last: null,
    msgs: new Map(),
    historyLoaded: false,
    oldest: 0,
    hasMore: false,
    receipts: new Map(),
    group: null,
    left: false,
  };
}

function conversation(cid) {
  let c = convs.get(cid);
  if (!c) {
    c = newConversation(cid);
    convs.set(cid, c);
  }
  return c;
}

function addMessage(c, m) {
  if (m.kind === "system") c.joins = null;
  c.msgs.set(m.seq, m);
  if (!c.last || m.seq >= c.last.seq) c.last = m;
  c.lastSeq = Math.max(c.lastSeq, m.seq);
}

function raiseReceipt(c, userId, delivered, read) {
  const r = c.receipts.get(userId) || { delivered_seq: 0, read_seq: 0 };
  r.delivered_seq = Math.max(r.delivered_seq, delivered, read);
  r.read_seq = Math.max(r.read_seq, read);
  c.receipts.set(userId, r);
}

// ------------------------------------------------------------------ small helpers

function showError(text) {
  const box = $("alerts");
  const item = h("div", { class: "alert" }, h("span", {}, text),
    h("button", { type: "button", class: "ghost", "aria-label": "Dismiss", onclick: () => item.remove() }, "✕"));
  box.append(item);
  while (box.children.length > 3) box.firstElementChild.remove();
  setTimeout(() => item.remove(), 15000);
}

function formError(form, text) {
  const p = form.querySelector(".error") || form.parentElement.querySelector(".error");
  p.textContent = text || "";
}

function clock(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function when(ts) {
  const d = new Date(ts);
  const now = new Date();
  if (d.toDateString() === now.toDateString()) return clock(ts);
  const days = (now - d) / 86400000;
  if (days < 6) return d.toLocaleDateString([], { weekday: "short" });
  return d.toLocaleDateString([], { day: "numeric", month: "short" });
}

function lastSeen(ts) {
  if (!ts) return "offline";
  const ago = Date.now() - ts;
  if (ago < 60000) return "last seen just now";
  const d = new Date(ts);
  if (d.toDateString() === new Date().toDateString()) return `last seen today at ${clock(ts)}`;
  return `last seen ${d.toLocaleDateString([], { day: "numeric", month: "short" })} at ${clock(ts)}`;
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(bytes < 10240 ? 1 : 0)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function groupNames() {
  try {
    return JSON.parse(localStorage.getItem(GROUP_NAMES_KEY) || "{}");
  } catch {
    return {};
  }
}

function formerGroups() {
  try {
    return JSON.parse(localStorage.getItem(FORMER_KEY) || "{}");
  } catch {
    return {};
  }
}

/** Keeps, on this device, the name and last message of a group the user is no longer in. */
function rememberFormer(c) {
  if (!c.left || c.kind !== "group") return;
  const all = formerGroups();
  const known = all[c.cid] || {};
  all[c.cid] = {
    name: c.group?.name || groupNames()[c.groupId] || known.name || null,
    last: c.last || known.last || null,
  };
  try {
    localStorage.setItem(FORMER_KEY, JSON.stringify(all));
  } catch {
    /* a nicety */
  }
}

/** A former group's history cannot be read any more: show what this device kept. */
function restoreFormer(c) {
  const f = formerGroups()[c.cid];
  if (f?.last && f.last.seq <= c.lastSeq && !c.msgs.has(f.last.seq)) addMessage(c, f.last);
}

/** A user's name as shown: "You" for oneself; loads unknown users and redraws. */
function nameOf(uid, capital = true) {
  if (me && uid === me.user_id) return capital ? "You" : "you";
  const u = users.get(uid);
  if (u) return u.display_name || u.handle;
  loadUser(uid);
  return "…";
}

function loadUser(uid) {
  if (users.has(uid)) return Promise.resolve(users.get(uid));
  if (!userLoads.has(uid)) {
    userLoads.set(uid, client.call("GET", `/users/${uid}`).then((u) => {
      const known = users.get(uid);
      users.set(uid, known ? { ...u, online: known.online, last_seen: known.last_seen } : u);
      render();
      return u;
    }).catch((e) => {
      userLoads.delete(uid);
      showError(`Could not load a user: ${e.message}`);
    }));
  }
  return userLoads.get(uid);
}

function title(c) {
  if (c.kind === "direct") return c.peerId === me.user_id ? `${me.display_name} (you)` : nameOf(c.peerId);
  if (c.kind === "group") {
    return c.group?.name || groupNames()[c.groupId] || formerGroups()[c.cid]?.name || (c.left ? "Former group" : "Group");
  }
  return "…";
}

function isVisible() {
  return document.visibilityState === "visible";
}

// ------------------------------------------------------------------ rendering

let renderTimer = null;
let stickToBottom = false;
/** Set while older messages are prepended: the scroll offset to keep. */
let keepOffsetFrom = null;

/** Draws now (e.g. before moving the focus into what is drawn). */
function renderNow() {
  clearTimeout(renderTimer);
  renderTimer = null;
  renderList();
  renderChat();
}

function render() {
  if (renderTimer) return;
  renderTimer = setTimeout(() => {
    renderTimer = null;
    renderList();
    renderChat();
  }, 0);
}

/** Brings `container`'s children in line with `keys`, reusing nodes by key. */
function reconcile(container, cache, keys, make, update) {
  const wanted = new Set(keys);
  for (const [k, node] of cache) {
    if (!wanted.has(k)) {
      node.remove();
      cache.delete(k);
    }
  }
  let cursor = container.firstElementChild;
  for (const k of keys) {
    let node = cache.get(k);
    if (!node) {
      node = make(k);
      cache.set(k, node);
    }
    update(node, k);
    if (node === cursor) cursor = cursor.nextElementSibling;
    else container.insertBefore(node, cursor);
  }
}

function unread(c) {
  // A former member can no longer mark anything read: nothing is waiting for it.
  if (c.left) return 0;
  return Math.max(0, c.lastSeq - c.readSeq);
}

function pendingIn(cid) {
  return [...(client?.outbox.values() || [])].filter((e) => e.cid === cid);
}

function latest(c) {
  const pending = pendingIn(c.cid);
  return Math.max(c.last?.ts || 0, ...pending.map((e) => e.createdAt));
}

function typingNames(c) {
  const now = Date.now();
  const who = [...(typing.get(c.cid) || new Map())].filter(([, until]) => until > now).map(([uid]) => uid);
  return who;
}

function preview(c) {
  const who = typingNames(c);
  if (who.length) return { text: c.kind === "group" ? `${nameOf(who[0])} is typing…` : "typing…", typing: true };
  const pending = pendingIn(c.cid).at(-1);
  const m = c.last;
  if (pending && (!m || pending.createdAt > m.ts)) return { text: `You: ${pending.body || pending.fileInfo?.name || "Attachment"}`, mine: true };
  if (!m) return { text: c.left ? "You are no longer a member" : "" };
  if (m.kind === "system") return { text: systemText(m) };
  const body = m.body || (m.media.length ? "Attachment" : "");
  if (m.sender_id === me.user_id) return { text: `You: ${body}`, mine: true, state: stateOf(c, m) };
  return { text: c.kind === "group" ? `${nameOf(m.sender_id)}: ${body}` : body };
}

const listNodes = new Map();

function renderList() {
  const list = $("conv-list");
  const shown = [...convs.values()]
    .filter((c) => c.kind && (c.lastSeq > 0 || pendingIn(c.cid).length))
    .sort((a, b) => latest(b) - latest(a));
  $("conv-empty").hidden = shown.length > 0 || loading;
  reconcile(list, listNodes, shown.map((c) => c.cid), (cid) => {
    const button = h("button", { type: "button", class: "conv", "data-cid": cid, onclick: () => openChat(cid) });
    return h("li", {}, button);
  }, (li, cid) => {
    const c = convs.get(cid);
    const button = li.firstElementChild;
    const n = unread(c);
    const p = preview(c);
    const name = title(c);
    const at = latest(c);
    const sig = JSON.stringify([name, n, p, at, cid === openCid]);
    if (li.dataset.sig === sig) return;
    li.dataset.sig = sig;
    if (cid === openCid) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
    button.setAttribute("aria-label", `${name}${n ? `, ${n} unread` : ""}`);
    button.replaceChildren(
      h("span", { class: "avatar", "aria-hidden": "true" }, (name[0] || "?").toUpperCase()),
      h("span", { class: "conv-main" },
        h("span", { class: "conv-top" },
          h("span", { class: "conv-name" }, name),
          h("time", { class: "conv-time" }, at ? when(at) : "")),
        h("span", { class: "conv-bottom" },
          h("span", { class: `conv-preview${p.typing ? " typing" : ""}` },
            p.state ? h("span", { class: `tick ${p.state.state}`, "aria-hidden": "true" }, tickGlyph(p.state.state)) : null,
            p.text),
          n ? h("span", { class: "badge", "data-unread": n }, String(n)) : null)),
    );
  });
}

/** The state of one of my stored messages: sent, delivered or read, from the receipts. */
function stateOf(c, m) {
  // In a group, only the members who were there when it was sent ever get a message.
  const joins = c.kind === "group" ? joinSeqs(c) : null;
  const others = c.kind === "group"
    ? (c.group?.members || []).map((x) => x.user_id).filter((id) => id !== me.user_id && (joins.get(id) || 0) < m.seq)
    : c.peerId === me.user_id ? [] : [c.peerId];
  const get = (id) => c.receipts.get(id) || { delivered_seq: 0, read_seq: 0 };
  const readBy = others.filter((id) => get(id).read_seq >= m.seq).length;
  const deliveredTo = others.filter((id) => get(id).delivered_seq >= m.seq).length;
  let state = !others.length ? "sent" : readBy === others.length ? "read" : deliveredTo === others.length ? "delivered" : "sent";
  // Membership changes must never move a tick backwards.
  if (!c.ticks) c.ticks = new Map();
  const seen = c.ticks.get(m.seq);
  if (seen && TICK_RANK[seen.state] > TICK_RANK[state]) state = seen.state;
  const best = { state, readBy: Math.max(readBy, seen?.readBy || 0) };
  c.ticks.set(m.seq, best);
  return { state, readBy: best.readBy, others: others.length };
}

const TICK_RANK = { sent: 0, delivered: 1, read: 2 };

/** user_id -> seq of the latest `member_added` for them among the loaded messages. */
function joinSeqs(c) {
  if (!c.joins) {
    c.joins = new Map();
    const sys = [...c.msgs.values()].filter((m) => m.kind === "system").sort((a, b) => a.seq - b.seq);
    for (const m of sys) {
      try {
        const b = JSON.parse(m.body);
        if (b.event === "member_added") c.joins.set(b.user_id, m.seq);
      } catch {
        /* not ours to read */
      }
    }
  }
  return c.joins;
}

function tickGlyph(state) {
  if (state === "pending") return icon("clock");
  if (state === "uploading") return icon("up");
  return { sent: "✓", delivered: "✓✓", read: "✓✓", failed: "!" }[state] || "";
}

const STATE_WORDS = {
  uploading: "Uploading",
  pending: "Sending",
  sent: "Sent",
  delivered: "Delivered",
  read: "Read",
  failed: "Not sent",
};

function systemText(m) {
  let b;
  try {
    b = JSON.parse(m.body);
  } catch {
    return "The group was updated";
  }
  const actor = nameOf(m.sender_id);
  switch (b.event) {
    case "group_created":
      return `${actor} created the group “${b.name}”`;
    case "member_added":
      return `${actor} added ${nameOf(b.user_id, false)}`;
    case "member_removed":
      return `${actor} removed ${nameOf(b.user_id, false)}`;
    case "member_left":
      return `${nameOf(b.user_id)} left${b.new_admin ? `; ${nameOf(b.new_admin, false)} ${b.new_admin === me.user_id ? "are" : "is"} now an admin` : ""}`;
    default:
      return "The group was updated";
  }
}

const msgNodes = new Map();
let msgNodesFor = null;

/** What the open chat shows: stored messages from `oldest` on, then unacked sends. */
function chatItems(c) {
  const stored = [...c.msgs.values()].filter((m) => m.seq >= c.oldest).sort((a, b) => a.seq - b.seq);
  const items = new Map();
  for (const m of stored) items.set(m.client_msg_id ? `c:${m.client_msg_id}` : `s:${m.seq}`, { m });
  for (const e of pendingIn(c.cid)) {
    const key = `c:${e.cmid}`;
    if (!items.has(key)) items.set(key, { entry: e });
  }
  return items;
}

function renderChat() {
  const c = openCid && convs.get(openCid);
  $("app-view").dataset.pane = c ? "chat" : "list";
  $("chat-none").hidden = !!c;
  $("chat-open").hidden = !c;
  if (!c) return;

  $("chat-title").textContent = title(c);
  $("chat-sub").textContent = subtitle(c);
  $("group-info").hidden = c.kind !== "group" || c.left;
  $("left-note").hidden = !c.left;
  $("composer").hidden = c.left;

  const scroller = $("scroller");
  const list = $("messages");
  if (msgNodesFor !== c.cid) {
    list.replaceChildren();
    msgNodes.clear();
    msgNodesFor = c.cid;
  }
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  const before = scroller.scrollHeight;
  $("older").hidden = !c.historyLoaded || !c.hasMore;
  $("history-note").hidden = c.historyLoaded;
  $("history-note").textContent = c.historyLoaded ? "" : "Loading messages…";
  const items = c.historyLoaded ? chatItems(c) : new Map();
  reconcile(list, msgNodes, [...items.keys()], (key) => makeMessage(c, items.get(key)),
    (node, key) => updateMessage(c, node, items.get(key)));
  if (keepOffsetFrom !== null) {
    scroller.scrollTop += scroller.scrollHeight - before;
    keepOffsetFrom = null;
  } else if (atBottom || stickToBottom) {
    scroller.scrollTop = scroller.scrollHeight;
  }
  stickToBottom = false;
}

function subtitle(c) {
  const who = typingNames(c);
  if (c.kind === "direct") {
    if (who.length) return "typing…";
    if (c.peerId === me.user_id) return "Notes to yourself";
    const u = users.get(c.peerId);
    if (!u) return "";
    return u.online ? "online" : lastSeen(u.last_seen);
  }
  if (c.left) return "You are no longer a member";
  if (who.length) return `${who.map((id) => nameOf(id)).join(", ")} ${who.length > 1 ? "are" : "is"} typing…`;
  const others = (c.group?.members || []).filter((x) => x.user_id !== me.user_id).map((x) => nameOf(x.user_id));
  return [...others, "You"].join(", ");
}

function makeMessage(c, item) {
  const m = item.m;
  if (m && m.kind === "system") return h("li", { class: "system", "data-seq": m.seq });
  const mine = m ? m.sender_id === me.user_id : true;
  const node = h("li", { class: `msg ${mine ? "mine" : "theirs"}` });
  const bubble = h("div", { class: "bubble" });
  if (!mine && c.kind === "group") bubble.append(h("div", { class: "sender" }));
  const media = h("div", { class: "media" });
  const entry = item.entry || (m && client.outbox.get(m.client_msg_id));
  const ids = m ? m.media : entry.media;
  const body = m ? m.body : entry.body;
  if (entry?.file && previews.has(entry.cmid)) {
    media.append(entry.fileInfo.type.startsWith("image/")
      ? h("img", { src: previews.get(entry.cmid), alt: entry.fileInfo.name })
      : fileButton(null, entry.fileInfo.name, entry.fileInfo.size));
  } else {
    for (const id of ids) media.append(attachment(id, body, mine ? "you" : nameOf(m.sender_id)));
  }
  bubble.append(media);
  bubble.append(h("div", { class: "body" }));
  bubble.append(h("div", { class: "meta" }));
  node.append(bubble);
  return node;
}

function updateMessage(c, node, item) {
  const m = item.m;
  if (m && m.kind === "system") {
    node.textContent = systemText(m);
    return;
  }
  const entry = item.entry || (m && client.outbox.get(m.client_msg_id));
  const mine = m ? m.sender_id === me.user_id : true;
  const body = m ? m.body : entry.body;
  const status = mine && m ? stateOf(c, m) : null;
  const sig = JSON.stringify([m?.seq, status, entry?.state, entry?.error, m && nameOf(m.sender_id), !!node.querySelector(".file")]);
  if (node.dataset.sig === sig) return;
  node.dataset.sig = sig;
  node.dataset.key = m?.client_msg_id || entry?.cmid || `s:${m.seq}`;
  if (m) node.dataset.seq = m.seq;
  const sender = node.querySelector(".sender");
  if (sender) sender.textContent = nameOf(m.sender_id);
  const bodyNode = node.querySelector(".body");
  const isFileName = (m ? m.media : entry.media).length > 0 && looksLikeFileName(body) && node.querySelector(".file");
  bodyNode.textContent = isFileName ? "" : body;
  bodyNode.hidden = !bodyNode.textContent;

  const meta = node.querySelector(".meta");
  const parts = [h("time", { datetime: new Date(m ? m.ts : entry.createdAt).toISOString() }, clock(m ? m.ts : entry.createdAt))];
  if (mine) {
    let state;
    let readBy = null;
    if (m) {
      state = status.state;
      if (c.kind === "group" && status.others) readBy = status.readBy;
    } else {
      state = entry.state;
    }
    node.dataset.state = state;
    if (readBy !== null) node.dataset.readBy = readBy;
    const words = STATE_WORDS[state];
    parts.push(h("span", { class: `tick ${state}`, title: words, "aria-label": words, role: "img" }, tickGlyph(state)));
    if (readBy) {
      parts.push(h("span", { class: "read-by" }, state === "read" ? "Read by all" : `Read by ${readBy}`));
    }
    if (!m && entry.error) {
      parts.push(h("span", { class: "send-error", role: "alert" }, entry.error));
      if (entry.state === "failed") {
        parts.push(h("button", { type: "button", class: "link", onclick: () => client.retry(entry.cmid) }, "Retry"));
        parts.push(h("button", { type: "button", class: "link", onclick: () => client.discard(entry.cmid) }, "Discard"));
      }
    }
  }
  meta.replaceChildren(...parts);
}

function looksLikeFileName(s) {
  return !!s && s.length <= 200 && !/[\n/\\]/.test(s) && /\.[A-Za-z0-9]{1,8}$/.test(s);
}

/** An attachment of a stored message: the image inline, anything else as a download. */
function attachment(id, body, from) {
  const box = h("div", { class: "attachment", "data-media-id": id }, "Loading attachment…");
  describeMedia(id).then((info) => {
    if (info.url) {
      box.replaceChildren(h("img", { src: info.url, alt: body && !looksLikeFileName(body) ? body : `Image from ${from}` }));
    } else {
      box.replaceChildren(fileButton(id, looksLikeFileName(body) ? body : "attachment", info.size, info.type));
    }
    render();
  }).catch((e) => {
    box.textContent = `Attachment unavailable: ${e.message}`;
  });
  return box;
}

function describeMedia(id) {
  if (!mediaInfo.has(id)) {
    const p = (async () => {
      const probe = await client.fetchMedia(id, "bytes=0-0");
      if (probe.status === 416) return { type: "application/octet-stream", size: 0 };
      const type = probe.headers.get("Content-Type") || "application/octet-stream";
      const range = probe.headers.get("Content-Range");
      const total = range ? Number(range.split("/")[1]) : Number(probe.headers.get("Content-Length") || 0);
      await probe.arrayBuffer();
      if (type.startsWith("image/") && total <= INLINE_IMAGE_MAX_BYTES) {
        const blob = await (await client.fetchMedia(id)).blob();
        return { type, size: total, url: URL.createObjectURL(blob) };
      }
      return { type, size: total };
    })();
    p.catch(() => mediaInfo.delete(id));
    mediaInfo.set(id, p);
  }
  return mediaInfo.get(id);
}

function fileButton(id, name, bytes) {
  const label = `${name} · ${size(bytes)}`;
  return h("button", {
    type: "button",
    class: "file",
    "aria-label": `Download ${label}`,
    disabled: id ? null : true,
    onclick: async () => {
      try {
        const blob = await (await client.fetchMedia(id)).blob();
        const url = URL.createObjectURL(blob);
        const a = h("a", { href: url, download: name });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60000);
      } catch (e) {
        showError(`Could not download ${name}: ${e.message}`);
      }
    },
  }, icon("file"), label);
}

// ------------------------------------------------------------------ loading

async function loadAll() {
  loading = true;
  render();
  try {
    const list = await client.call("GET", "/conversations");
    for (const e of list) mergeEntry(e);
    await inBatches(list, 8, (e) => loadDetails(conversation(e.conversation_id)));
    for (const c of convs.values()) if (!c.left && c.deliveredSeq < c.lastSeq) client.mark(c.cid, "delivered", c.lastSeq);
    watchPeers();
  } catch (e) {
    showError(`Could not load your conversations: ${e.message}`);
  } finally {
    loading = false;
    render();
  }
}

/** Re-reads the conversation list (own watermarks may have moved on another device). */
async function refreshConversations() {
  try {
    const list = await client.call("GET", "/conversations");
    const fresh = list.filter((e) => !convs.get(e.conversation_id)?.kind);
    for (const e of list) mergeEntry(e);
    await inBatches(fresh, 8, (e) => loadDetails(conversation(e.conversation_id)));
    watchPeers();
    render();
  } catch (e) {
    showError(`Could not refresh your conversations: ${e.message}`);
  }
}

let refreshTimer = null;
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshConversations, 100);
}

function mergeEntry(e) {
  const c = conversation(e.conversation_id);
  c.kind = e.kind;
  c.peerId = e.peer_id ?? null;
  c.groupId = e.group_id ?? null;
  c.lastSeq = Math.max(c.lastSeq, e.last_seq);
  c.readSeq = Math.max(c.readSeq, e.read_seq);
  c.deliveredSeq = Math.max(c.deliveredSeq, e.delivered_seq);
}

async function inBatches(items, n, f) {
  for (let i = 0; i < items.length; i += n) await Promise.all(items.slice(i, i + n).map(f));
}

async function loadDetails(c) {
  // A former member may not read the group any more: learn that first, then stay quiet.
  if (c.kind === "group" && !c.group) await loadGroup(c);
  if (c.left) restoreFormer(c);
  const tasks = [];
  if (!c.last && c.lastSeq > 0 && !c.left) {
    tasks.push(client.call("GET", `/conversations/${c.cid}/messages?limit=1`).then((r) => {
      for (const m of r.messages) addMessage(c, m);
    }).catch((e) => {
      if (e.status !== 403) throw e;
    }));
  }
  if (c.kind === "direct") tasks.push(loadUser(c.peerId));
  await Promise.all(tasks);
}

async function loadGroup(c) {
  if (!c.groupId) return;
  try {
    setGroup(c, await client.call("GET", `/groups/${c.groupId}`));
  } catch (e) {
    if (e.status === 403) {
      c.left = true;
      restoreFormer(c);
    } else showError(`Could not load the group: ${e.message}`);
  }
  render();
}

function setGroup(c, g) {
  c.group = g;
  c.groupId = g.group_id;
  c.left = !g.members.some((x) => x.user_id === me.user_id);
  const names = groupNames();
  names[g.group_id] = g.name;
  try {
    localStorage.setItem(GROUP_NAMES_KEY, JSON.stringify(names));
  } catch {
    /* names are a nicety */
  }
  for (const x of g.members) if (x.user_id !== me.user_id) loadUser(x.user_id);
  if ($("info-dialog").open && openCid === c.cid) renderInfo();
}

function watchPeers() {
  const peers = [...convs.values()]
    .filter((c) => c.kind === "direct" && c.lastSeq > 0 && c.peerId !== me.user_id)
    .map((c) => c.peerId);
  client.watchPresence(peers);
}

// ------------------------------------------------------------------ the open chat

async function openChat(cid) {
  openCid = cid;
  stickToBottom = true;
  const c = conversation(cid);
  if (c.left) restoreFormer(c);
  renderNow();
  if (!c.left) $("text").focus();
  if (!c.historyLoaded && c.left) {
    // A former member can no longer read the history: show what is here.
    c.oldest = c.msgs.size ? Math.min(...c.msgs.keys()) : c.lastSeq + 1;
    c.historyLoaded = true;
  }
  if (!c.historyLoaded) {
    try {
      const r = await client.call("GET", `/conversations/${cid}/messages?limit=${PAGE}`);
      for (const m of r.messages) addMessage(c, m);
      c.oldest = r.messages.length ? r.messages[0].seq : c.lastSeq + 1;
      c.hasMore = r.messages.length === PAGE;
    } catch (e) {
      // A direct chat whose first message is not sent yet does not exist.
      // A former group member is refused (403): it is shown read-only, quietly.
      if (e.status === 403 && c.kind === "group") {
        c.left = true;
        restoreFormer(c);
      } else if (e.code !== "unknown_conversation") showError(`Could not load the messages: ${e.message}`);
      c.oldest = c.msgs.size ? Math.min(...c.msgs.keys()) : 1;
    }
    c.historyLoaded = true;
    stickToBottom = true;
  }
  if (c.kind === "group" && !c.left) loadGroup(c);
  loadReceipts(c);
  markRead();
  render();
}

async function loadReceipts(c) {
  if (c.lastSeq === 0 || c.left) return;
  try {
    const list = await client.call("GET", `/conversations/${c.cid}/receipts`);
    for (const r of list) raiseReceipt(c, r.user_id, r.delivered_seq, r.read_seq);
    render();
  } catch (e) {
    if (e.code !== "unknown_conversation" && e.status !== 403) showError(`Could not load receipts: ${e.message}`);
  }
}

async function loadOlder() {
  const c = convs.get(openCid);
  if (!c || !c.hasMore || c.loadingOlder) return;
  c.loadingOlder = true;
  try {
    const r = await client.call("GET", `/conversations/${c.cid}/messages?before_seq=${c.oldest}&limit=${PAGE}`);
    for (const m of r.messages) addMessage(c, m);
    if (r.messages.length) c.oldest = r.messages[0].seq;
    c.hasMore = r.messages.length === PAGE;
    keepOffsetFrom = c.cid;
    render();
  } catch (e) {
    showError(`Could not load older messages: ${e.message}`);
  } finally {
    c.loadingOlder = false;
  }
  // Still at the top (a short page): the observer sees no change, so go on here.
  setTimeout(() => {
    if (openCid === c.cid && c.hasMore && $("scroller").scrollTop < 40) loadOlder();
  }, 50);
}

/** Marks the open chat read up to its last message, while the page is seen. */
function markRead() {
  const c = openCid && convs.get(openCid);
  if (!c || !isVisible() || c.left || c.lastSeq <= c.readSeq) return;
  c.readSeq = c.lastSeq;
  client.mark(c.cid, "read", c.lastSeq);
  channel?.postMessage({ type: "read", cid: c.cid, seq: c.lastSeq });
  render();
}

// ------------------------------------------------------------------ events from the server

function onMessage({ message: m }) {
  const c = conversation(m.conversation_id);
  if (!c.kind) refreshSoon();
  addMessage(c, m);
  if (m.kind === "system") onSystem(c, m);
  if (m.sender_id === me.user_id) {
    // Sending implies having read what came before.
    c.readSeq = Math.max(c.readSeq, m.seq);
    // Once out of a group, marks are refused (not_member): send none.
    if (!c.left) client.mark(c.cid, "read", m.seq);
  } else {
    if (!c.left) client.mark(c.cid, "delivered", m.seq);
    typing.get(c.cid)?.delete(m.sender_id);
  }
  if (c.cid === openCid) markRead();
  render();
}

function onSystem(c, m) {
  let b;
  try {
    b = JSON.parse(m.body);
  } catch {
    return;
  }
  const gone = (b.event === "member_removed" || b.event === "member_left") && b.user_id === me.user_id;
  if (gone) {
    c.left = true;
    if (c.group) c.group = { ...c.group, members: c.group.members.filter((x) => x.user_id !== me.user_id) };
    rememberFormer(c);
    if (c.cid === openCid && $("info-dialog").open) $("info-dialog").close();
  } else if (b.event === "member_added" && b.user_id === me.user_id) {
    // Added (back): a new conversation is looked up by refreshSoon (see onMessage).
    c.left = false;
    if (c.groupId) loadGroup(c);
  } else if (c.groupId) {
    loadGroup(c);
  }
}

function onAck({ ack, entry }) {
  const c = conversation(ack.conversation_id);
  if (entry) {
    if (!c.kind && entry.toUser) {
      c.kind = "direct";
      c.peerId = entry.toUser;
    }
    addMessage(c, {
      message_id: ack.message_id,
      conversation_id: ack.conversation_id,
      seq: ack.seq,
      sender_id: me.user_id,
      kind: "user",
      body: entry.body,
      media: entry.media,
      client_msg_id: ack.client_msg_id,
      ts: ack.ts,
    });
    if (entry.mediaInfo && previews.has(entry.cmid) && entry.fileInfo.type.startsWith("image/")) {
      mediaInfo.set(entry.media[0], Promise.resolve({ type: entry.fileInfo.type, size: entry.fileInfo.size, url: previews.get(entry.cmid) }));
    }
  }
  c.readSeq = Math.max(c.readSeq, ack.seq);
  client.mark(c.cid, "read", ack.seq);
  if (c.kind === "direct" && c.peerId !== me.user_id) client.watchPresence([c.peerId]);
  render();
}

function onReceipt({ detail: r }) {
  const c = conversation(r.conversation_id);
  raiseReceipt(c, r.user_id, r.seq, r.status === "read" ? r.seq : 0);
  render();
}

function onPresence({ detail: p }) {
  const u = users.get(p.user_id) || {};
  users.set(p.user_id, { ...u, user_id: p.user_id, online: p.online, last_seen: p.last_seen });
  if (!u.handle) loadUser(p.user_id);
  render();
}

function onTyping({ detail: t }) {
  if (!typing.has(t.conversation_id)) typing.set(t.conversation_id, new Map());
  typing.get(t.conversation_id).set(t.user_id, Date.now() + TYPING_SHOWN_MS);
  setTimeout(render, TYPING_SHOWN_MS + 50);
  render();
}

function onStatus({ detail: s }) {
  const bar = $("conn");
  const text = $("conn-text");
  $("app-view").dataset.conn = s.state;
  clearInterval(onStatus.countdown);
  if (s.state === "online") {
    bar.hidden = true;
    return;
  }
  bar.hidden = false;
  $("conn-retry").hidden = s.state !== "offline";
  if (s.state === "connecting") {
    text.textContent = "Connecting…";
    return;
  }
  const until = Date.now() + s.retryInMs;
  const tick = () => {
    const secs = Math.max(0, Math.ceil((until - Date.now()) / 1000));
    text.textContent = navigator.onLine === false
      ? "You are offline. Messages will be sent when the connection is back."
      : `Connection lost. Reconnecting in ${secs} s…`;
  };
  tick();
  onStatus.countdown = setInterval(tick, 1000);
}

// ------------------------------------------------------------------ actions

function submitMessage(ev) {
  ev?.preventDefault();
  const c = convs.get(openCid);
  if (!c || c.left) return;
  const input = $("text");
  const file = $("file").files[0] || null;
  let body = input.value.replace(/\s+$/, "");
  if (!body.trim() && !file) return;
  if (file && !body.trim() && !(file.type || "").startsWith("image/")) body = file.name;
  const target = c.kind === "direct" ? { toUser: c.peerId } : { conversationId: c.cid };
  const entry = client.send({ ...target, cid: c.cid, body, file });
  if (file) previews.set(entry.cmid, URL.createObjectURL(file));
  input.value = "";
  clearAttachment();
  stickToBottom = true;
  render();
  input.focus();
}

function clearAttachment() {
  $("file").value = "";
  $("attachment").hidden = true;
}

async function findUser(handle) {
  const clean = handle.trim().replace(/^@/, "").toLowerCase();
  if (!clean) throw new Error("Enter a handle.");
  let u;
  try {
    u = await client.call("GET", `/users?handle=${encodeURIComponent(clean)}`);
  } catch (e) {
    if (e.code === "unknown_user") throw new Error(`No one has the handle “${clean}”.`);
    throw e;
  }
  users.set(u.user_id, { ...users.get(u.user_id), ...u });
  return u;
}

async function startChat(ev) {
  ev.preventDefault();
  const form = ev.target;
  formError(form, "");
  try {
    const u = await findUser(form.elements.handle.value);
    const cid = directConversationId(me.user_id, u.user_id);
    const c = conversation(cid);
    c.kind = "direct";
    c.peerId = u.user_id;
    form.closest("dialog").close();
    form.reset();
    openChat(cid);
  } catch (e) {
    formError(form, e.message);
  }
}

async function createGroup(ev) {
  ev.preventDefault();
  const form = ev.target;
  formError(form, "");
  const name = form.elements.name.value.trim();
  const handles = form.elements.members.value.split(/[\s,]+/).filter(Boolean);
  try {
    if (!name) throw new Error("Give the group a name.");
    const members = [];
    for (const handle of handles) members.push((await findUser(handle)).user_id);
    const g = await client.call("POST", "/groups", { json: { name, members } });
    const c = conversation(g.conversation_id);
    c.kind = "group";
    setGroup(c, g);
    form.closest("dialog").close();
    form.reset();
    openChat(c.cid);
  } catch (e) {
    formError(form, e.message);
  }
}

function renderInfo() {
  const c = convs.get(openCid);
  const dialog = $("info-dialog");
  if (!c || !c.group) return;
  const admin = c.group.members.some((x) => x.user_id === me.user_id && x.role === "admin");
  $("info-title").textContent = c.group.name;
  $("info-members").replaceChildren(...c.group.members.map((x) => h("li", {},
    h("span", {}, nameOf(x.user_id), x.role === "admin" ? h("span", { class: "role" }, " · admin") : null),
    admin && x.user_id !== me.user_id
      ? h("button", {
        type: "button",
        class: "link danger",
        onclick: () => askConfirm(`Remove ${nameOf(x.user_id, false)} from “${c.group.name}”?`, "Yes, remove", () => removeMember(c, x.user_id)),
      }, `Remove ${nameOf(x.user_id, false)}`)
      : null)));
  $("add-member").hidden = !admin || c.left;
  $("leave").hidden = c.left;
  if (c.left) dialog.querySelector(".error").textContent = "You are no longer a member of this group.";
}

/** A confirm step inside the group dialog, for what cannot be undone from here. */
let confirmAction = null;

function askConfirm(text, yes, action) {
  confirmAction = action;
  $("info-confirm-text").textContent = text;
  $("info-confirm-yes").textContent = yes;
  $("info-confirm").hidden = false;
  $("info-buttons").hidden = true;
  // Cancel first: one more Enter changes nothing.
  $("info-confirm-no").focus();
}

function closeConfirm() {
  confirmAction = null;
  $("info-confirm").hidden = true;
  $("info-buttons").hidden = false;
}

async function removeMember(c, uid) {
  const dialog = $("info-dialog");
  dialog.querySelector(".error").textContent = "";
  try {
    setGroup(c, await client.call("DELETE", `/groups/${c.groupId}/members/${uid}`));
    if (uid === me.user_id) {
      c.left = true;
      rememberFormer(c);
      dialog.close();
    }
    renderInfo();
    render();
  } catch (e) {
    dialog.querySelector(".error").textContent = e.message;
  }
}

async function addMember(ev) {
  ev.preventDefault();
  const c = convs.get(openCid);
  const dialog = $("info-dialog");
  const form = ev.target;
  dialog.querySelector(".error").textContent = "";
  try {
    const u = await findUser(form.elements.handle.value);
    setGroup(c, await client.call("POST", `/groups/${c.groupId}/members`, { json: { user_id: u.user_id } }));
    form.reset();
    renderInfo();
    render();
  } catch (e) {
    dialog.querySelector(".error").textContent = e.message;
  }
}

// ------------------------------------------------------------------ session

function saveSession(s) {
  localStorage.setItem(SESSION_KEY, JSON.stringify(s));
}

function storedSession() {
  try {
    const s = JSON.parse(localStorage.getItem(SESSION_KEY) || "null");
    return s && s.token && s.expires_at > Date.now() ? s : null;
  } catch {
    return null;
  }
}

async function startSession(s) {
  try {
    me = await api("GET", "/users/me", { token: s.token });
  } catch (e) {
    if (e.status === 401) {
      localStorage.removeItem(SESSION_KEY);
      return showLogin("Your session has ended. Please log in again.");
    }
    return showLogin(`Could not reach the server: ${e.message}`);
  }
  users.set(me.user_id, me);
  client = new Client({ token: s.token, userId: me.user_id });
  client.addEventListener("status", onStatus);
  client.addEventListener("synced", ({ detail }) => {
    if (detail.first) loadAll();
    else {
      refreshConversations();
      const c = openCid && convs.get(openCid);
      if (c) loadReceipts(c);
    }
  });
  client.addEventListener("message", ({ detail }) => onMessage(detail));
  client.addEventListener("ack", ({ detail }) => onAck(detail));
  client.addEventListener("outbox", ({ detail }) => {
    if (detail.entry.done && !detail.entry.file) previews.delete(detail.entry.cmid);
    render();
  });
  client.addEventListener("receipt", onReceipt);
  client.addEventListener("presence", onPresence);
  client.addEventListener("typing", onTyping);
  client.addEventListener("servererror", ({ detail }) => {
    // not_member: a mark, typing or presence watch about a group one has left; nothing to do.
    if (detail.code === "not_member") return;
    showError(detail.message);
  });
  client.addEventListener("revoked", ({ detail }) => endSession(detail.message));
  channel = "BroadcastChannel" in window ? new BroadcastChannel(`switchboard.${me.user_id}`) : null;
  if (channel) {
    channel.onmessage = ({ data }) => {
      if (data.type === "read") {
        const c = conversation(data.cid);
        c.readSeq = Math.max(c.readSeq, data.seq);
        render();
      }
    };
  }
  $("me-name").textContent = me.display_name;
  $("me-handle").textContent = `@${me.handle}`;
  $("login-view").hidden = true;
  $("app-view").hidden = false;
  document.title = `Switchboard · ${me.display_name}`;
  client.start();
  render();
}

function endSession(message) {
  client?.stop();
  client = null;
  channel?.close();
  channel = null;
  localStorage.removeItem(SESSION_KEY);
  for (const p of mediaInfo.values()) p.then((i) => i.url && URL.revokeObjectURL(i.url), () => {});
  for (const url of previews.values()) URL.revokeObjectURL(url);
  for (const m of [convs, users, userLoads, typing, mediaInfo, previews, listNodes, msgNodes]) m.clear();
  openCid = null;
  msgNodesFor = null;
  me = null;
  $("conv-list").replaceChildren();
  $("messages").replaceChildren();
  $("alerts").replaceChildren();
  $("conn").hidden = true;
  for (const d of document.querySelectorAll("dialog")) d.close();
  showLogin(message);
}

async function logout() {
  try {
    await client.call("DELETE", "/sessions/current");
  } catch (e) {
    if (e.status !== 401) return showError(`Could not log out: ${e.message}`);
  }
  endSession("You have logged out.");
}

function showLogin(note) {
  $("app-view").hidden = true;
  $("login-view").hidden = false;
  $("login-note").textContent = note || "";
  $("login-form").hidden = false;
  $("register-form").hidden = true;
  document.title = "Switchboard";
  $("login-handle").focus();
}

async function login(ev) {
  ev.preventDefault();
  const form = ev.target;
  formError(form, "");
  const handle = form.elements.handle.value.trim().toLowerCase();
  if (!handle || !form.elements.password.value) return formError(form, "Enter your handle and your password.");
  try {
    const s = await api("POST", "/sessions", { json: { handle, password: form.elements.password.value } });
    saveSession(s);
    form.reset();
    await startSession(s);
  } catch (e) {
    formError(form, accountError(e));
  }
}

// The account rules of CONTRACT.md, checked before sending so the words can be plain.
const HANDLE_RULE = /^[a-z0-9_.-]{3,32}$/;
const PASSWORD_MIN = 8;
const PASSWORD_MAX_BYTES = 1024;

function handleProblem(handle) {
  if (!handle) return "Choose a handle.";
  if (handle.length < 3) return "Your handle needs at least 3 characters.";
  if (handle.length > 32) return "Your handle can have at most 32 characters.";
  if (!HANDLE_RULE.test(handle)) return "A handle can only use the letters a to z, digits, and _ . -";
  return null;
}

function passwordProblem(password) {
  if ([...password].length < PASSWORD_MIN) return `Your password needs at least ${PASSWORD_MIN} characters.`;
  if (new TextEncoder().encode(password).length > PASSWORD_MAX_BYTES) return "That password is too long.";
  return null;
}

/** Plain words for the account errors the form may still get back; anything else as sent. */
function accountError(e) {
  switch (e.code) {
    case "invalid_handle":
      return "A handle has 3 to 32 characters: the letters a to z, digits, and _ . -";
    case "invalid_password":
      return `Your password needs at least ${PASSWORD_MIN} characters.`;
    case "invalid_display_name":
      return "A display name has 1 to 64 characters, with no control characters.";
    case "invalid_credentials":
      return "That handle and password do not match.";
    default:
      return e.message;
  }
}

async function register(ev) {
  ev.preventDefault();
  const form = ev.target;
  formError(form, "");
  const handle = form.elements.handle.value.trim().toLowerCase();
  const password = form.elements.password.value;
  const problem = handleProblem(handle) || passwordProblem(password);
  if (problem) return formError(form, problem);
  const json = { handle, password };
  if (form.elements.display_name.value.trim()) json.display_name = form.elements.display_name.value.trim();
  try {
    await api("POST", "/users", { json });
    const s = await api("POST", "/sessions", { json: { handle, password } });
    saveSession(s);
    form.reset();
    await startSession(s);
  } catch (e) {
    formError(form, accountError(e));
  }
}

// ------------------------------------------------------------------ wiring

function wire() {
  $("login-form").addEventListener("submit", login);
  $("register-form").addEventListener("submit", register);
  for (const b of document.querySelectorAll("[data-show]")) {
    b.addEventListener("click", () => {
      $("login-form").hidden = b.dataset.show !== "login-form";
      $("register-form").hidden = b.dataset.show !== "register-form";
      $(b.dataset.show).querySelector("input").focus();
    });
  }
  $("logout").addEventListener("click", logout);
  $("conn-retry").addEventListener("click", () => client?.reconnectNow());
  $("new-chat").addEventListener("click", () => {
    $("chat-dialog").showModal();
  });
  $("new-group").addEventListener("click", () => $("group-dialog").showModal());
  $("chat-dialog").querySelector("form").addEventListener("submit", startChat);
  $("group-dialog").querySelector("form").addEventListener("submit", createGroup);
  $("add-member").addEventListener("submit", addMember);
  $("leave").addEventListener("click", () => {
    const c = convs.get(openCid);
    if (c) askConfirm(`Leave “${title(c)}”? You will no longer get its messages.`, "Yes, leave", () => removeMember(c, me.user_id));
  });
  $("info-confirm-no").addEventListener("click", () => {
    closeConfirm();
    $("info-title").focus();
  });
  $("info-confirm-yes").addEventListener("click", () => {
    const action = confirmAction;
    closeConfirm();
    $("info-title").focus();
    action?.();
  });
  $("info-dialog").addEventListener("close", closeConfirm);
  $("group-info").addEventListener("click", () => {
    const c = convs.get(openCid);
    if (!c || c.left) return;
    $("info-dialog").querySelector(".error").textContent = "";
    closeConfirm();
    renderInfo();
    $("info-dialog").showModal();
    // Start on the title, not on the first "Remove …" button.
    $("info-title").focus();
  });
  for (const b of document.querySelectorAll("[data-close]")) {
    b.addEventListener("click", () => b.closest("dialog").close());
  }
  $("back").addEventListener("click", () => {
    const was = openCid;
    openCid = null;
    render();
    setTimeout(() => document.querySelector(`[data-cid="${was}"]`)?.focus(), 10);
  });
  $("composer").addEventListener("submit", submitMessage);
  $("text").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) submitMessage(ev);
  });
  $("text").addEventListener("input", () => {
    const c = convs.get(openCid);
    if (c && c.lastSeq > 0 && !c.left && $("text").value) client.typing(c.cid);
  });
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => {
    const f = $("file").files[0];
    $("attachment").hidden = !f;
    if (f) $("attachment-name").replaceChildren(icon("clip"), ` ${f.name} · ${size(f.size)}`);
    $("text").focus();
  });
  $("attachment-clear").addEventListener("click", clearAttachment);
  $("older").addEventListener("click", loadOlder);
  // Older messages load when the top comes into view (or is scrolled to).
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadOlder();
  }, { root: $("scroller") }).observe($("older"));
  $("scroller").addEventListener("scroll", () => {
    if ($("scroller").scrollTop < 40 && !$("older").hidden) loadOlder();
  }, { passive: true });
  document.addEventListener("visibilitychange", () => {
    if (isVisible() && client) {
      markRead();
      refreshSoon();
    }
  });
  window.addEventListener("storage", (ev) => {
    if (ev.key !== SESSION_KEY) return;
    if (!ev.newValue && client) endSession("You logged out in another tab.");
    else if (ev.newValue && !client) {
      const s = storedSession();
      if (s) startSession(s);
    }
  });
}

wire();
const saved = storedSession();
if (saved) startSession(saved);
else showLogin();
