// history.test.js — a room whose kept history is bigger than one welcome frame carries (256 KiB):
// the page fetches the older messages the welcome left out (`more`) from the HTTP API and shows
// every kept message once, in id order, with the live ones that arrive meanwhile after them.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  describePages, launchBrowser, messageTexts, openChat, problems, say, startServer, waitForMessage,
} from './harness.js';

const TOKEN = 'test-token-456';
const ROOM = 'archive';
const BIG = 60_000; // characters per message: 6 of them are more than a welcome holds
const COUNT = 6;

let server;
let browser;

before(async () => {
  // The room's byte rate is raised so that the API may post the big messages back to back.
  server = await startServer({ args: ['--api-token', TOKEN, '--room-rate-bytes', '10000000'] });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close().catch(() => {});
  await server?.stop();
});

/** Posts a message through the HTTP API; returns its id. */
async function post(text) {
  const response = await fetch(`${server.url}/api/rooms/${ROOM}/messages`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ text, from: 'archivist' }),
    signal: AbortSignal.timeout(5000),
  });
  const body = await response.text();
  assert.equal(response.status, 201, `POST /api/rooms/${ROOM}/messages: ${body}`);
  return JSON.parse(body).id;
}

/** The first frame a WebSocket client gets at `url` (its welcome), read from a tab on the
 * server's origin (the server checks `Origin`) that is not the chat page. */
async function firstFrame(url) {
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    await page.goto(`${server.url}/healthz`);
    return await page.evaluate((u) => new Promise((resolve, reject) => {
      const ws = new WebSocket(u);
      ws.onmessage = (event) => { resolve(JSON.parse(event.data)); ws.close(); };
      ws.onerror = () => reject(new Error(`cannot connect to ${u}`));
    }), url);
  } finally {
    await context.close();
  }
}

/** Message `i`: a recognisable head, then filler up to BIG characters. */
function bigText(i) {
  const head = `part ${i} `;
  return head + 'x'.repeat(BIG - head.length);
}

test('a welcome with `more` is completed from the API, in order', { timeout: 60_000 }, async () => {
  for (let i = 1; i <= COUNT; i += 1) await post(bigText(i));
  const welcome = await firstFrame(`${server.wsUrl}?room=${ROOM}`);
  assert.equal(welcome.more, true, 'the room holds more than one welcome carries');
  assert.ok(welcome.history.length < COUNT, `welcome carried ${welcome.history.length}`);

  const reader = await openChat(browser, server, { name: 'reader', room: ROOM });
  try {
    await waitForMessage(reader.page, bigText(COUNT));
    await say(reader.page, 'live after the archive');
    await waitForMessage(reader.page, 'live after the archive');
    const heads = (await messageTexts(reader.page)).map((t) => t.replace(/ x+$/, ''));
    const parts = [...Array(COUNT).keys()].map((i) => `part ${i + 1}`);
    assert.deepEqual(heads, [...parts, 'live after the archive']);
    assert.deepEqual(await problems(reader), []);
  } catch (err) {
    err.message += `\n${server.output()}\n${await describePages([reader])}`;
    throw err;
  } finally {
    await reader.context.close();
  }
});
