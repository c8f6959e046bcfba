// harness.js — shared helpers of the browser tests: start / stop a wschat server process,
// launch Debian's Chromium through playwright-core, open a chat page as some user, and wait
// for things with a timeout (nothing here waits forever).

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const REPO = path.resolve(fileURLToPath(new URL('../..', import.meta.url)));
export const BIN = process.env.WSCHAT_BIN || path.join(REPO, 'target', 'debug', 'wschat');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const SCREENSHOTS = path.join(REPO, 'target', 'screenshots');

const LISTENING = /wschat listening: (https?:\/\/[^\s/]+)\/? \(websocket (wss?:\/\/\S+?)\)/;
const START_TIMEOUT_MS = 10_000;
const WAIT_MS = 10_000; // default for every wait on the page

// ---- the server ----------------------------------------------------------------------------

/**
 * Starts wschat with --port (0 = any free port; the page and WebSockets share it) and --www <repo>/www, plus `args`.
 * Resolves once it printed its "wschat listening: ..." line.
 * @returns {Promise<{url: string, wsUrl: string, port: number, args: string[],
 *   stop: () => Promise<void>, output: () => string}>}
 */
export async function startServer({ port = 0, args = [] } = {}) {
  if (!fs.existsSync(BIN)) {
    throw new Error(`wschat binary not found at ${BIN}: run \`cargo build\` in ${REPO} first (or set WSCHAT_BIN)`);
  }
  const fullArgs = ['--port', String(port), '--www', path.join(REPO, 'www'), ...args];
  const child = spawn(BIN, fullArgs, {
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => { stderr += chunk; });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  const output = () => `--- wschat ${fullArgs.join(' ')}\n--- stdout:\n${stdout}\n--- stderr:\n${stderr.slice(-8000)}`;

  const match = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`wschat did not print its "listening" line within ${START_TIMEOUT_MS} ms\n${output()}`));
    }, START_TIMEOUT_MS);
    child.stdout.on('data', (chunk) => {
      stdout += chunk;
      const m = LISTENING.exec(stdout);
      if (m) { clearTimeout(timer); resolve(m); }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`wschat exited early (code ${code}, signal ${signal})\n${output()}`));
    });
  });

  let stopped = false;
  async function stop() {
    if (stopped) return;
    stopped = true;
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    const killer = setTimeout(() => child.kill('SIGKILL'), 3000);
    await exited;
    clearTimeout(killer);
  }

  const url = match[1];
  const wsUrl = match[2];
  return {
    url,
    wsUrl,
    port: Number(new URL(url).port),
    args,
    stop,
    output,
    exited,
  };
}

/** Starts a server on fixed ports, retrying a few times while the old ports are still busy. */
export async function restartServer(old, { tries = 20 } = {}) {
  let lastError;
  for (let i = 0; i < tries; i += 1) {
    try {
      return await startServer({ port: old.port, args: old.args });
    } catch (err) {
      lastError = err;
      await sleep(250);
    }
  }
  throw lastError;
}

// ---- the browser ---------------------------------------------------------------------------

/** Launches headless Chromium; `args` adds flags (e.g. `--ignore-certificate-errors`). */
export async function launchBrowser({ args = [] } = {}) {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}: install it with \`apt-get install -y chromium\` or set CHROMIUM`);
  }
  return chromium.launch({
    executablePath: CHROMIUM,
    timeout: 30_000,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync', ...args],
  });
}

/**
 * Opens the chat page in a new browser context (a separate "person") as `name` in `room`,
 * and waits until it is online with that name.
 * Collects console errors, page errors, CSP violations and dialogs in the returned object.
 */
export async function openChat(browser, server, { name, room = 'lobby', viewport, colorScheme, waitOnline = true } = {}) {
  const context = await browser.newContext({ viewport: viewport || { width: 1000, height: 700 }, colorScheme });
  context.setDefaultTimeout(WAIT_MS);
  const chat = { context, name };
  try {
    await openTab(chat, server, { name, room, waitOnline });
  } catch (err) {
    await context.close().catch(() => {});
    throw err;
  }
  return chat;
}

/**
 * Opens the chat page in a new tab of `chat.context` (sharing its localStorage), remembering
 * `name` there first unless a name is remembered already. Makes it `chat.page`; the tab's
 * console errors, dialogs, WebSocket frames sent and error lines shown are collected in
 * `chat.consoleErrors`, `chat.dialogs`, `chat.sentFrames` and `window.__errorLines`.
 */
export async function openTab(chat, server, { name, room = 'lobby', waitOnline = true } = {}) {
  const page = await chat.context.newPage();
  chat.page = page;
  chat.consoleErrors ??= [];
  chat.dialogs ??= [];
  chat.sentFrames ??= [];
  page.on('console', (msg) => {
    if (msg.type() === 'error') chat.consoleErrors.push(msg.text());
  });
  page.on('pageerror', (err) => chat.consoleErrors.push(`pageerror: ${err.message}`));
  page.on('dialog', (dialog) => {
    chat.dialogs.push(dialog.message());
    dialog.dismiss().catch(() => {});
  });
  page.on('websocket', (ws) => ws.on('framesent', (frame) => chat.sentFrames.push(String(frame.payload))));
  await page.addInitScript((nick) => {
    window.__csp = [];
    document.addEventListener('securitypolicyviolation', (e) => {
      window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`);
    });
    if (nick && !localStorage.getItem('wschat.nick')) localStorage.setItem('wschat.nick', nick);
    window.__errorLines = [];
    document.addEventListener('DOMContentLoaded', () => {
      const error = document.getElementById('error');
      new MutationObserver(() => {
        if (error.textContent) window.__errorLines.push(error.textContent);
      }).observe(error, { childList: true, characterData: true, subtree: true });
    });
  }, name || '');
  const started = Date.now();
  const inFlight = new Map();
  page.on('request', (r) => inFlight.set(r, Date.now() - started));
  page.on('requestfinished', (r) => inFlight.delete(r));
  page.on('requestfailed', (r) => inFlight.delete(r));
  try {
    await page.goto(`${server.url}/#${room}`, { timeout: WAIT_MS });
    if (waitOnline) await waitOnlineAs(page, name, room);
  } catch (err) {
    const pending = [...inFlight].map(([r, at]) => `${r.method()} ${r.url()} (sent at +${at} ms)`);
    err.message += `\n${name}'s page: requests still waiting: ${pending.join(', ') || 'none'}`;
    throw err;
  }
  return page;
}

/** Waits until the page says "online" in `room` (and, if given, under `name`). */
export async function waitOnlineAs(page, name, room) {
  await page.waitForFunction(({ name, room }) => {
    const status = document.getElementById('status');
    return status.dataset.state === 'online'
      && (!name || document.getElementById('nick').value === name)
      && (!room || document.getElementById('room-name').textContent === `#${room}`)
      && (!name || document.querySelector(`#users li[data-name="${CSS.escape(name)}"]`) !== null);
  }, { name, room }, { timeout: WAIT_MS });
}

/** CSP violations recorded in the page plus console errors (minus the ones `allow` matches). */
export async function problems(chat, allow = []) {
  const csp = await chat.page.evaluate(() => window.__csp).catch(() => []);
  const errors = chat.consoleErrors.filter((text) => !allow.some((re) => re.test(text)));
  return [...csp.map((v) => `CSP violation: ${v}`), ...errors];
}

/** A short description of each page's state, for failure messages. */
export async function describePages(chats) {
  const parts = [];
  for (const chat of chats) {
    const state = await chat.page.evaluate(() => ({
      status: document.getElementById('status')?.textContent,
      nick: document.getElementById('nick')?.value,
      room: document.getElementById('room-name')?.textContent,
      users: [...document.querySelectorAll('#users li')].map((n) => n.dataset.name),
      messages: [...document.querySelectorAll('#messages li')].map((n) => n.textContent).slice(-15),
      typing: document.getElementById('typing')?.textContent,
      error: document.getElementById('error')?.textContent,
    })).catch((err) => ({ closed: err.message.split('\n')[0] }));
    parts.push(`--- page of ${chat.name}: ${JSON.stringify(state)}\n    console errors: ${JSON.stringify(chat.consoleErrors)}`);
  }
  return parts.join('\n');
}

// ---- reading and acting on the page --------------------------------------------------------

/** Types `text` in the message box and presses Enter. */
export async function say(page, text) {
  await page.fill('#input', text);
  await page.press('#input', 'Enter');
}

/** Texts of the chat messages shown, in order. */
export function messageTexts(page) {
  return page.$$eval('#messages li.message .text', (nodes) => nodes.map((n) => n.textContent));
}

/** Waits until a message with exactly this text is shown; returns its attributes. */
export async function waitForMessage(page, text, timeout = WAIT_MS) {
  await page.waitForFunction(
    (t) => [...document.querySelectorAll('#messages li.message .text')].some((n) => n.textContent === t),
    text, { timeout },
  );
  return page.evaluate((t) => {
    const li = [...document.querySelectorAll('#messages li.message')].find((n) => n.querySelector('.text').textContent === t);
    return {
      id: li.dataset.id,
      from: li.querySelector('.from').textContent,
      time: li.querySelector('.time').textContent,
      classes: [...li.classList],
    };
  }, text);
}

/** Waits until some element matching `selector` has text containing `text`. */
export function waitForText(page, selector, text, timeout = WAIT_MS) {
  return page.waitForFunction(
    ({ selector, text }) => [...document.querySelectorAll(selector)].some((n) => n.textContent.includes(text)),
    { selector, text }, { timeout },
  );
}

/** Waits until the first element matching `selector` has exactly the text `expected`. */
export function waitForTextOf(page, selector, expected, timeout = WAIT_MS) {
  return page.waitForFunction(
    ({ selector, expected }) => document.querySelector(selector)?.textContent === expected,
    { selector, expected }, { timeout },
  );
}

/** Names in the member list. */
export function userNames(page) {
  return page.$$eval('#users li', (nodes) => nodes.map((n) => n.dataset.name));
}

export function waitForUsers(page, names, timeout = WAIT_MS) {
  return page.waitForFunction(
    (want) => JSON.stringify([...document.querySelectorAll('#users li')].map((n) => n.dataset.name)) === JSON.stringify(want),
    names, { timeout },
  );
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
