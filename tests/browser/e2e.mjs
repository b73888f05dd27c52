// End-to-end test of the web client in headless Chromium, driven by Playwright.
//
//   node tests/browser/e2e.mjs http://127.0.0.1:<port>
//
// The node at that address is driven only through the browser: three people register
// in their own browser contexts, chat, watch the ticks go from sent to delivered to
// read, see typing and presence, make a group, send an image and a file, lose and get
// back their connection, and use two tabs. `tests/browser.rs` starts a fresh node and
// runs this. With SCREENSHOT_DIR set, the main screens are saved there as web-*.png.
//
// Chromium is Debian's (`apt-get install chromium`); CHROMIUM_PATH overrides the path.

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { chromium } from "playwright-core";

import { directConversationId } from "../../web/client.js";

const base = process.argv[2];
if (!base) {
  console.error("usage: node e2e.mjs <base-url of a running switchboard node>");
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const SHOTS = process.env.SCREENSHOT_DIR;
const WAIT_MS = 10000;
const OVERALL_MS = 150000;

const started = Date.now();
let current = "start";
const problems = [];
let passed = 0;

function step(name) {
  current = name;
  console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${name}`);
  passed++;
}

/** Polls `fn` until it returns a truthy value; fails naming `what` and the last value. */
async function until(what, fn, timeout = WAIT_MS) {
  const from = Date.now();
  const deadline = from + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) {
        if (Date.now() - from > 1000) console.log(`    (${what}: ${Date.now() - from} ms)`);
        return last;
      }
    } catch (e) {
      last = `error: ${e.message}`;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what} (last seen: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Waits until `fn()` gives `want`, reporting the last value it gave otherwise. */
async function untilEquals(what, fn, want, timeout = WAIT_MS) {
  let seen;
  await until(what, async () => {
    seen = await fn();
    return seen === want;
  }, timeout).catch((e) => {
    throw new Error(`${e.message}; wanted ${JSON.stringify(want)}, got ${JSON.stringify(seen)}`);
  });
}

async function shot(page, name) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, `web-${name}.png`) });
}

const suffix = `${process.pid % 10000}${Math.floor(Math.random() * 1000)}`;
const PASSWORD = "correct horse battery";

/** A person in a browser context of their own (phone-sized when `phone`). */
async function person(browser, name, { phone = false } = {}) {
  const context = await browser.newContext({
    viewport: phone ? { width: 390, height: 760 } : { width: 1180, height: 740 },
    deviceScaleFactor: 1,
    locale: "en-GB",
  });
  context.setDefaultTimeout(WAIT_MS);
  const page = await context.newPage();
  watch(page, name);
  return { name, handle: `${name.toLowerCase()}_${suffix}`, context, page };
}

const pages = [];

function watch(page, who) {
  pages.push({ page, who });
  page.on("pageerror", (e) => problems.push(`${who}: uncaught ${e.message}`));
  page.on("console", (m) => {
    if (/Content.Security.Policy|Refused to/i.test(m.text())) problems.push(`${who}: ${m.text()}`);
  });
}

/** The rows of the open chat whose text includes `text` (`mine` narrows to own ones). */
function msg(page, text, mine) {
  return page.locator(`#messages li.msg${mine === undefined ? "" : mine ? ".mine" : ".theirs"}`).filter({ hasText: text });
}

async function stateOf(page, text) {
  return msg(page, text, true).getAttribute("data-state", { timeout: WAIT_MS });
}

async function waitState(page, text, want) {
  let seen;
  await until(`"${text}" to be ${want} for the sender`, async () => {
    seen = await stateOf(page, text);
    return seen === want;
  }).catch((e) => {
    throw new Error(`${e.message}; its state: ${seen}`);
  });
}

/** How many message rows show exactly `text` as their body. */
async function countBodies(page, text) {
  return page.locator("#messages li.msg .body").evaluateAll((els, t) => els.filter((e) => e.textContent === t).length, text);
}

function convButton(page, name) {
  return page.locator("#conv-list button.conv").filter({ has: page.locator(".conv-name", { hasText: new RegExp(`^${name}$`) }) });
}

async function send(page, text) {
  await page.getByLabel("Message", { exact: true }).fill(text);
  await page.getByLabel("Message", { exact: true }).press("Enter");
}

async function register(p, displayName, password = PASSWORD) {
  const form = p.page.locator("#register-form");
  if (!(await form.isVisible())) await p.page.getByRole("button", { name: "Create an account" }).click();
  await form.getByLabel("Handle").fill(p.handle);
  await form.getByLabel("Display name").fill(displayName);
  await form.getByLabel("Password").fill(password);
  await form.getByRole("button", { name: "Create account" }).click();
}

async function signedIn(p, displayName) {
  await until(`${p.name} to be signed in`, async () => (await p.page.locator("#me-name").textContent()) === displayName);
  await until(`${p.name} to be connected`, async () => (await p.page.locator("#app-view").getAttribute("data-conn")) === "online");
}

async function run(browser) {
  step("direct conversation ids match PROTOCOL.md's test vectors");
  const [a, b] = ["3f2c9a1e-7b4d-4c8e-9a61-0d5e2b7f4c13", "b81e4d27-5c9a-4f03-8e2d-6a7c1f90e5b4"];
  assert.equal(directConversationId(a, b), "45b7a6f3-39fb-5ac4-9025-f02b26e510c8");
  assert.equal(directConversationId(b, a), "45b7a6f3-39fb-5ac4-9025-f02b26e510c8");
  assert.equal(directConversationId(a, a), "26850fd6-d04e-573c-be6e-0531a7cdd767");

  const alice = await person(browser, "Alice");
  const bob = await person(browser, "Bob", { phone: true });
  const carol = await person(browser, "Carol");

  // Alice's socket runs through a relay that can lose one send's answers and cut the
  // connection, as a network would the moment after the server stored the message.
  const relay = { sends: [], armed: false, cut: null };
  await alice.context.routeWebSocket(/\/api\/v1\/ws/, (ws) => {
    const server = ws.connectToServer();
    ws.onMessage((m) => {
      const f = JSON.parse(m);
      if (f.type === "send") {
        relay.sends.push(f.client_msg_id);
        if (relay.armed && !relay.cut) relay.cut = f.client_msg_id;
      }
      server.send(m);
    });
    server.onMessage((m) => {
      const f = JSON.parse(m);
      const cmid = f.client_msg_id || f.message?.client_msg_id;
      if (relay.armed && cmid && cmid === relay.cut) {
        relay.armed = false;
        ws.close({ code: 4000, reason: "test: connection lost" });
        server.close();
        return;
      }
      ws.send(m);
    });
    ws.onClose(() => server.close());
    server.onClose(() => ws.close());
  });

  step("the page is served with its assets, and asks to log in");
  const res = await alice.page.goto(`${base}/`);
  assert.equal(res.status(), 200);
  assert.match(res.headers()["content-security-policy"], /script-src 'self'/);
  await alice.page.getByRole("heading", { name: "Log in" }).waitFor();
  await shot(alice.page, "login");

  step("Alice registers and is signed in");
  await register(alice, "Alice");
  await signedIn(alice, "Alice");

  step("a taken handle is refused in words");
  await bob.page.goto(`${base}/`);
  const bobHandle = bob.handle;
  bob.handle = alice.handle;
  // (With Alice's password this would be a retry of her registration, answered 201.)
  await register(bob, "Bob", "another password");
  await until("the handle_taken message", async () => /already taken/.test(await bob.page.locator("#register-form .error").textContent()));
  bob.handle = bobHandle;
  await register(bob, "Bob");
  await signedIn(bob, "Bob");

  step("Carol registers, logs out and logs in again");
  await carol.page.goto(`${base}/`);
  await register(carol, "Carol");
  await signedIn(carol, "Carol");
  await carol.page.getByRole("button", { name: "Log out" }).click();
  await until("the logged-out note", async () => /logged out/.test(await carol.page.locator("#login-note").textContent()));
  const login = carol.page.locator("#login-form");
  await login.getByLabel("Handle").fill(carol.handle);
  await login.getByLabel("Password").fill("wrong password");
  await login.getByRole("button", { name: "Log in" }).click();
  await until("the invalid_credentials message", async () => (await login.locator(".error").textContent()).length > 0);
  await login.getByLabel("Password").fill(PASSWORD);
  await login.getByRole("button", { name: "Log in" }).click();
  await signedIn(carol, "Carol");

  step("Alice starts a chat with Bob by handle and sees him online");
  await alice.page.getByRole("button", { name: "New chat" }).click();
  await alice.page.getByLabel("Their handle").fill(bob.handle);
  await alice.page.getByRole("button", { name: "Open chat" }).click();
  await until("Bob's name in the chat header", async () => (await alice.page.locator("#chat-title").textContent()) === "Bob");
  await until("the message box focused after Open chat", async () => alice.page.evaluate(() => document.activeElement?.id === "text"));
  await until("Bob online", async () => (await alice.page.locator("#chat-sub").textContent()) === "online");

  step("Alice's message goes from sent to delivered while Bob has not opened it");
  await send(alice.page, "Hi Bob!");
  await until("the message to show", async () => (await msg(alice.page, "Hi Bob!", true).count()) === 1);
  await waitState(alice.page, "Hi Bob!", "delivered");
  await until("Bob's unread badge", async () => (await convButton(bob.page, "Alice").locator(".badge").textContent()) === "1");

  step("Bob opens the chat: Alice sees it read, Bob's badge is gone");
  await convButton(bob.page, "Alice").click();
  await until("the message at Bob's", async () => (await msg(bob.page, "Hi Bob!", false).count()) === 1);
  await waitState(alice.page, "Hi Bob!", "read");
  await bob.page.getByRole("button", { name: "Back to conversations" }).click();
  await until("no badge at Bob's", async () => (await convButton(bob.page, "Alice").locator(".badge").count()) === 0);
  await convButton(bob.page, "Alice").click();

  step("Bob types: Alice sees typing; his reply arrives and is read at once");
  await bob.page.getByLabel("Message", { exact: true }).pressSequentially("Hey Alice, how", { delay: 20 });
  await until("typing… at Alice's", async () => (await alice.page.locator("#chat-sub").textContent()) === "typing…");
  await bob.page.getByLabel("Message", { exact: true }).pressSequentially(" are you?", { delay: 5 });
  await bob.page.getByLabel("Message", { exact: true }).press("Enter");
  await until("Bob's reply at Alice's", async () => (await msg(alice.page, "how are you?", false).count()) === 1);
  await waitState(bob.page, "how are you?", "read");
  await send(alice.page, "Great, thanks! Shall we plan the weekend?");
  await waitState(alice.page, "plan the weekend", "read");

  step("Alice creates a group with Bob, then adds Carol");
  await alice.page.getByRole("button", { name: "New group" }).click();
  await alice.page.getByLabel("Group name").fill("Weekend plans");
  await alice.page.getByLabel("Members").fill(`${bob.handle}, nobody_${suffix}`);
  await alice.page.getByRole("button", { name: "Create group" }).click();
  await until("the unknown_user message", async () => /nobody_/.test(await alice.page.locator("#group-dialog .error").textContent()));
  await alice.page.getByLabel("Members").fill(bob.handle);
  await alice.page.getByRole("button", { name: "Create group" }).click();
  await until("the group chat", async () => (await alice.page.locator("#chat-title").textContent()) === "Weekend plans");
  await until("the creation note", async () => (await alice.page.locator("#messages li.system").first().textContent()) === "You created the group “Weekend plans”");
  await alice.page.getByRole("button", { name: "Group info" }).click();
  await alice.page.getByLabel("Add a member by handle").fill(carol.handle);
  await alice.page.locator("#add-member").getByRole("button", { name: "Add" }).click();
  await until("Carol in the member list", async () => /Carol/.test(await alice.page.locator("#info-members").textContent()));
  await alice.page.locator("#info-dialog").getByRole("button", { name: "Close" }).click();
  await until("Carol sees the group", async () => (await convButton(carol.page, "Weekend plans").count()) === 1);
  await until("Bob sees the group", async () => (await convButton(bob.page, "Weekend plans").count()) === 1);

  step("Alice sends an image and a file; both others get them, and 'read by 2'");
  const image = await sunset(browser);
  await alice.page.locator("#file").setInputFiles({ name: "sunset.png", mimeType: "image/png", buffer: image });
  await until("the attachment chip", async () => /sunset\.png/.test(await alice.page.locator("#attachment").textContent()));
  await send(alice.page, "Sunset from the balcony");
  await alice.page.locator("#file").setInputFiles({ name: "packing-list.txt", mimeType: "text/plain", buffer: Buffer.from("tent\nstove\nmap\n") });
  await alice.page.getByRole("button", { name: "Send" }).click();
  await until("the file at Alice's", async () => (await alice.page.locator("#messages button.file").count()) === 1);
  await carol.page.getByRole("button", { name: /Weekend plans/ }).click();
  await bob.page.getByRole("button", { name: "Back to conversations" }).click();
  await bob.page.getByRole("button", { name: /Weekend plans/ }).click();
  for (const p of [bob, carol]) {
    await until(`the image rendered at ${p.name}'s`, async () =>
      msg(p.page, "Sunset from the balcony", false).locator("img").evaluate((img) => img.complete && img.naturalWidth === 480));
    await until(`the file offered to ${p.name}`, async () =>
      (await p.page.getByRole("button", { name: /Download packing-list\.txt/ }).count()) === 1);
  }
  const [download] = await Promise.all([
    carol.page.waitForEvent("download"),
    carol.page.getByRole("button", { name: /Download packing-list\.txt/ }).click(),
  ]);
  assert.equal(download.suggestedFilename(), "packing-list.txt");
  await until("read by 2", async () => (await msg(alice.page, "Sunset from the balcony", true).getAttribute("data-read-by")) === "2");
  await waitState(alice.page, "Sunset from the balcony", "read");

  step("in the group, Carol types and Alice sees who");
  await carol.page.getByLabel("Message", { exact: true }).pressSequentially("Lovely", { delay: 20 });
  await until("Carol is typing", async () => /Carol is typing…/.test(await alice.page.locator("#chat-sub").textContent()));
  await carol.page.getByLabel("Message", { exact: true }).press("Enter");
  await send(bob.page, "Count me in, I will bring the tent");
  await until("both replies at Alice's", async () => (await msg(alice.page, "Count me in", false).count()) === 1 && (await msg(alice.page, "Lovely", false).count()) === 1);
  await shot(bob.page, "phone");
  await shot(alice.page, "group");

  step("the conversation list is ordered by latest message, with ticks in the chat");
  await until("the group first in Alice's list", async () => /Weekend plans/.test(await alice.page.locator("#conv-list li").first().textContent()));
  await convButton(alice.page, "Bob").click();
  await until("the direct chat", async () => (await msg(alice.page, "Hi Bob!", true).count()) === 1);
  await shot(alice.page, "chat");

  step("Bob loses his network: Alice sees him go offline; his send waits");
  await bob.page.getByRole("button", { name: "Back to conversations" }).click();
  await convButton(bob.page, "Alice").click();
  await bob.context.setOffline(true);
  await until("Bob's offline banner", async () => /offline|Reconnecting/i.test(await bob.page.locator("#conn").textContent()) && (await bob.page.locator("#conn").isVisible()));
  await until("last seen at Alice's", async () => /last seen/.test(await alice.page.locator("#chat-sub").textContent()), 15000);
  await send(alice.page, "Are you there?");
  await waitState(alice.page, "Are you there?", "sent");
  await send(bob.page, "Back in a minute");
  assert.equal(await stateOf(bob.page, "Back in a minute"), "pending");

  step("Bob's network comes back: one copy each way, and the ticks catch up");
  await bob.context.setOffline(false);
  await until("Bob online again", async () => (await bob.page.locator("#app-view").getAttribute("data-conn")) === "online", 20000);
  await waitState(bob.page, "Back in a minute", "read");
  await until("Alice's message at Bob's", async () => (await msg(bob.page, "Are you there?", false).count()) === 1);
  await waitState(alice.page, "Are you there?", "read");
  await until("Bob online at Alice's", async () => (await alice.page.locator("#chat-sub").textContent()) === "online");
  assert.equal(await countBodies(alice.page, "Back in a minute"), 1);
  assert.equal(await countBodies(bob.page, "Are you there?"), 1);
  assert.equal(await countBodies(bob.page, "Back in a minute"), 1);

  step("a send stored but never acknowledged is resent with its id after reconnecting, once");
  relay.armed = true;
  await send(alice.page, "Exactly once");
  await until("the relay to cut the connection", async () => relay.cut && !relay.armed);
  await until("Alice reconnected and acked", async () =>
    (await alice.page.locator("#app-view").getAttribute("data-conn")) === "online" && (await stateOf(alice.page, "Exactly once")) !== "pending", 20000);
  assert.ok(relay.sends.filter((id) => id === relay.cut).length >= 2, "the send went out again with the same client_msg_id");
  await until("the message at Bob's", async () => (await countBodies(bob.page, "Exactly once")) === 1);
  await waitState(alice.page, "Exactly once", "read");
  assert.equal(await countBodies(alice.page, "Exactly once"), 1);
  assert.equal(await countBodies(bob.page, "Exactly once"), 1);

  step("a second tab shows the same state and follows the first");
  const tab2 = await alice.context.newPage();
  watch(tab2, "Alice tab 2");
  await tab2.goto(`${base}/`);
  await signedIn({ name: "Alice (tab 2)", page: tab2 }, "Alice");
  await until("both conversations in tab 2", async () => (await tab2.locator("#conv-list li").count()) === 2);
  await send(bob.page, "Seen in both tabs?");
  await until("the preview in tab 2", async () => /Seen in both tabs\?/.test(await convButton(tab2, "Bob").textContent()));
  await until("read in tab 1 clears tab 2's badge", async () => (await convButton(tab2, "Bob").locator(".badge").count()) === 0);
  await convButton(tab2, "Bob").click();
  await until("the same history in tab 2", async () => (await countBodies(tab2, "Seen in both tabs?")) === 1 && (await countBodies(tab2, "Exactly once")) === 1);
  await send(tab2, "Yes, from tab 2");
  await until("tab 2's message in tab 1", async () => (await countBodies(alice.page, "Yes, from tab 2")) === 1);
  await until("tab 2's message at Bob's", async () => (await countBodies(bob.page, "Yes, from tab 2")) === 1);

  // Background tabs get throttled timers; the rest is in the first tab.
  await alice.page.bringToFront();

  step("history loads older messages on scroll, without duplicates");
  await carol.page.getByRole("button", { name: "New chat" }).click();
  await carol.page.getByLabel("Their handle").fill(bob.handle);
  await carol.page.getByLabel("Their handle").press("Enter");
  await until("the message box focused after Enter in New chat", async () => carol.page.evaluate(() => document.activeElement?.id === "text"));
  const lines = 56;
  await carol.page.getByLabel("Message", { exact: true }).focus();
  for (let i = 1; i <= lines; i++) {
    await carol.page.keyboard.insertText(`line ${i}`);
    await carol.page.keyboard.press("Enter");
  }
  await until("all lines sent", async () => (await carol.page.locator('#messages li.msg[data-state="pending"]').count()) === 0 && (await countBodies(carol.page, `line ${lines}`)) === 1, 20000);
  await bob.page.getByRole("button", { name: "Back to conversations" }).click();
  await convButton(bob.page, "Carol").click();
  await until("the latest page at Bob's", async () => (await countBodies(bob.page, `line ${lines}`)) === 1);
  assert.equal(await countBodies(bob.page, "line 1"), 0, "only the latest page is loaded at first");
  await bob.page.locator("#scroller").evaluate((s) => { s.scrollTop = 0; });
  await untilEquals("the first line after scrolling up", () => countBodies(bob.page, "line 1"), 1);
  const bodies = await bob.page.locator("#messages li.msg .body").allTextContents();
  assert.equal(bodies.length, lines);
  assert.equal(new Set(bodies).size, lines, "no duplicates");

  step("a refused send says why, and can be discarded");
  await carol.page.getByLabel("Message", { exact: true }).fill("x".repeat(70000));
  await carol.page.getByRole("button", { name: "Send" }).click();
  await until("the refusal in words", async () =>
    (await carol.page.locator('#messages li.msg[data-state="failed"] .send-error').textContent()).includes("bytes"));
  await carol.page.getByRole("button", { name: "Discard" }).click();
  await until("the refused message gone", async () => (await carol.page.locator('#messages li.msg[data-state="failed"]').count()) === 0);

  step("Carol leaves the group; Alice removes Bob; both see it");
  await convButton(carol.page, "Weekend plans").click();
  await carol.page.getByRole("button", { name: "Group info" }).click();
  await until("the group dialog opens on its title", async () => carol.page.evaluate(() => document.activeElement?.id === "info-title"));
  await carol.page.getByRole("button", { name: "Leave group" }).click();
  await carol.page.locator("#info-dialog").getByRole("button", { name: "Yes, leave" }).click();
  await until("Carol's left note", async () => carol.page.locator("#left-note").isVisible());
  assert.equal(await carol.page.locator("#composer").isVisible(), false);
  await convButton(alice.page, "Weekend plans").click();
  await until("Carol left, at Alice's", async () => (await alice.page.locator("#messages li.system").filter({ hasText: "Carol left" }).count()) === 1);
  await alice.page.getByRole("button", { name: "Group info" }).click();
  await alice.page.getByRole("button", { name: "Remove Bob" }).click();
  await alice.page.locator("#info-dialog").getByRole("button", { name: "Yes, remove" }).click();
  await until("Bob gone from the members", async () => !/Bob/.test(await alice.page.locator("#info-members").textContent()));
  await alice.page.keyboard.press("Escape");
  await bob.page.getByRole("button", { name: "Back to conversations" }).click();
  await convButton(bob.page, "Weekend plans").click();
  await until("Bob told he was removed", async () => (await bob.page.locator("#messages li.system").filter({ hasText: "Alice removed you" }).count()) === 1);
  await until("Bob's left note", async () => bob.page.locator("#left-note").isVisible());
  assert.equal(await bob.page.locator("#group-info").isVisible(), false, "no Group info for a former member");

  step("a former member logs in again: the group keeps its name, read-only, with no errors");
  await carol.page.getByRole("button", { name: "Log out" }).click();
  await until("Carol logged out", async () => carol.page.locator("#login-view").isVisible());
  await login.getByLabel("Handle").fill(carol.handle);
  await login.getByLabel("Password").fill(PASSWORD);
  await login.getByRole("button", { name: "Log in" }).click();
  await signedIn(carol, "Carol");
  await until("the former group listed by name", async () => (await convButton(carol.page, "Weekend plans").count()) === 1);
  await until("Carol's list loaded", async () => (await carol.page.locator("#conv-list li").count()) === 2);
  await carol.page.waitForTimeout(500);
  assert.equal(await convButton(carol.page, "Weekend plans").locator(".badge").count(), 0, "no unread badge on a former group");
  await convButton(carol.page, "Weekend plans").click();
  await until("read-only with the left note", async () => carol.page.locator("#left-note").isVisible());
  assert.equal(await carol.page.locator("#chat-sub").textContent(), "You are no longer a member");
  assert.equal(await carol.page.locator("#group-info").isVisible(), false);
  assert.equal(await carol.page.locator("#composer").isVisible(), false);
  await carol.page.waitForTimeout(300);
  assert.equal(await carol.page.locator("#alerts .alert").count(), 0, "no error toast at Carol's");
  assert.equal(await bob.page.locator("#alerts .alert").filter({ hasText: /member/ }).count(), 0, "no not-a-member toast at Bob's");

  step("on a phone, a long display name truncates and keeps Log out on screen");
  const erin = await person(browser, "Erin", { phone: true });
  const erinName = "Erin with a rather long display name indeed";
  await erin.page.goto(`${base}/`);
  await register(erin, erinName);
  await signedIn(erin, erinName);
  const inView = (page, sel) => (typeof sel === "string" ? page.locator(sel) : sel).evaluate((el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth;
  });
  assert.ok(await inView(erin.page, "#logout"), "Log out within the viewport");
  assert.ok(await inView(erin.page, "#new-group"), "New group within the viewport");
  assert.ok(await erin.page.locator("#me-name").evaluate((el) => el.scrollWidth > el.clientWidth), "the name is truncated");
  await erin.page.getByRole("button", { name: "New chat" }).click();
  await erin.page.getByLabel("Their handle").fill(bob.handle);
  await erin.page.getByLabel("Their handle").press("Enter");
  await until("Erin's message box focused", async () => erin.page.evaluate(() => document.activeElement?.id === "text"));
  await erin.page.keyboard.insertText("Hello from Erin");
  await erin.page.keyboard.press("Enter");
  await waitState(erin.page, "Hello from Erin", "delivered");
  await bob.page.getByRole("button", { name: "Back to conversations" }).click();
  await until("Erin's chat at Bob's", async () => (await convButton(bob.page, erinName).locator(".badge").count()) === 1);
  assert.ok(await inView(bob.page, convButton(bob.page, erinName).locator(".badge")), "the unread badge within the viewport");
  assert.ok(await inView(bob.page, "#logout"), "Bob's Log out within the viewport");
  await convButton(bob.page, erinName).click();
  await until("Erin's name in Bob's chat header", async () => (await bob.page.locator("#chat-title").textContent()) === erinName);
  assert.ok(await inView(bob.page, "#chat-title"), "the chat title within the viewport");
  assert.ok(await inView(bob.page, "#send"), "Send within the viewport");

  step("logging out in one tab logs out the other");
  await tab2.bringToFront();
  await tab2.getByRole("button", { name: "Log out" }).click();
  await until("tab 1 back at the login", async () => alice.page.locator("#login-view").isVisible());

  assert.deepEqual(problems, [], "no script errors and no policy violations");
}

/** A 480x300 PNG of a sunset, drawn by the browser itself. */
async function sunset(browser) {
  const page = await browser.newPage({ viewport: { width: 480, height: 300 } });
  await page.setContent(`<body style="margin:0">
    <div style="width:480px;height:300px;position:relative;overflow:hidden;background:linear-gradient(#fdba74,#f472b6 55%,#4c1d95)">
      <div style="position:absolute;left:170px;top:150px;width:140px;height:140px;border-radius:50%;background:#fde68a"></div>
      <div style="position:absolute;left:0;right:0;bottom:0;height:90px;background:#1e1b4b"></div>
    </div></body>`);
  const png = await page.screenshot();
  await page.close();
  return png;
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const guard = setTimeout(async () => {
  console.error(`FAILED: the whole run took over ${OVERALL_MS / 1000} s (at step: ${current})`);
  await Promise.race([browser.close(), new Promise((r) => setTimeout(r, 5000))]);
  process.exit(1);
}, OVERALL_MS);
let failed = false;
try {
  await run(browser);
  console.log(`web client end-to-end: ${passed} passed, 0 failed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
} catch (e) {
  failed = true;
  console.error(`FAILED at step "${current}": ${e.stack || e}`);
  if (problems.length) console.error(`page problems:\n  ${problems.join("\n  ")}`);
  const dir = path.join(tmpdir(), `switchboard-e2e-${process.pid}`);
  mkdirSync(dir, { recursive: true });
  for (const { page, who } of pages) {
    const file = path.join(dir, `${who.replace(/\W+/g, "-")}.png`);
    if (await page.screenshot({ path: file }).then(() => true, () => false)) console.error(`screen of ${who}: ${file}`);
  }
} finally {
  clearTimeout(guard);
  await browser.close().catch(() => {});
}
process.exit(failed ? 1 : 0);
