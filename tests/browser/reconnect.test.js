// reconnect.test.js — the page survives a server restart: it shows "reconnecting in N s",
// reconnects by itself with ?since=<last id>, and shows the messages posted while it was away
// (through the HTTP API) in order, once each, after a "reconnected — N missed messages"
// divider. A second outage longer than the server's history says that some were lost.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  describePages, launchBrowser, messageTexts, openChat, problems, restartServer, say,
  startServer, waitForMessage,
} from './harness.js';

const TOKEN = 'test-token-123';
const ROOM = 'recon';
const HISTORY = 6; // --history: messages kept per room
// Expected while the server is away: failed connection attempts and room-list polls, and a poll
// that lands while the server shuts down (its dispatcher already stopped, HTTP not yet): a 503.
const OUTAGE_NOISE = [/WebSocket connection to .* failed/, /ERR_CONNECTION_REFUSED/,
  /the server responded with a status of 503/];

let dataDir;
let server;
let browser;

before(async () => {
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'wschat-browser-test-'));
  server = await startServer({ args: ['--data-dir', dataDir, '--api-token', TOKEN, '--history', String(HISTORY)] });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close().catch(() => {});
  await server?.stop();
  if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
});

/** Posts a message through the HTTP API, as deploy-bot. */
async function post(text) {
  const response = await fetch(`${server.url}/api/rooms/${ROOM}/messages`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ text, from: 'deploy-bot' }),
    signal: AbortSignal.timeout(5000),
  });
  const body = await response.text();
  assert.equal(response.status, 201, `POST /api/rooms/${ROOM}/messages: ${body}`);
  return JSON.parse(body).id;
}

/**
 * Stops the server, waits until the page's next attempt is more than 2.5 s away (so that it
 * cannot reconnect too early), restarts the server on the same ports with the same data dir,
 * and posts `texts` while the page is still disconnected.
 */
async function outage(page, texts) {
  await server.stop();
  await page.waitForFunction(() => /^reconnecting in \d+ s$/.test(document.getElementById('status').textContent)
    && document.getElementById('status').dataset.state === 'reconnecting', null, { timeout: 10_000 });
  await page.waitForFunction(() => {
    const status = document.getElementById('status');
    return status.dataset.state === 'reconnecting' && Number(status.dataset.retryAt) - Date.now() > 2500;
  }, null, { timeout: 30_000 });
  server = await restartServer(server);
  for (const text of texts) await post(text);
  const stillAway = await page.$eval('#status', (s) => s.dataset.state);
  assert.notEqual(stillAway, 'online', 'the page reconnected before the messages were posted');
}

/** The list as the tests see it: messages as "m:<text>", dividers as "d:<text>", notices as "n:<text>". */
function listItems(page) {
  return page.$$eval('#messages li', (nodes) => nodes.map((n) => {
    if (n.classList.contains('message')) return `m:${n.querySelector('.text').textContent}`;
    if (n.classList.contains('divider')) return `d:${n.textContent}`;
    return `n:${n.textContent}`;
  }));
}

test('the page reconnects after a server restart and shows what it missed', { timeout: 120_000 }, async () => {
  const alice = await openChat(browser, server, { name: 'alice', room: ROOM });
  try {
    await say(alice.page, 'before 1');
    await waitForMessage(alice.page, 'before 1'); // so the API post cannot overtake it
    await post('before 2');
    await waitForMessage(alice.page, 'before 2');

    // first outage: 3 messages while away, all still in the server's history
    await outage(alice.page, ['missed 1', 'missed 2', 'missed 3']);
    await alice.page.waitForFunction(() => document.getElementById('status').dataset.state === 'online',
      null, { timeout: 20_000 });
    await waitForMessage(alice.page, 'missed 3');
    assert.deepEqual(await listItems(alice.page), [
      'm:before 1', 'm:before 2',
      'd:reconnected — 3 missed messages',
      'm:missed 1', 'm:missed 2', 'm:missed 3',
    ]);
    const ids = await alice.page.$$eval('#messages li.message', (n) => n.map((li) => Number(li.dataset.id)));
    assert.deepEqual(ids, [...ids].sort((a, b) => a - b), 'messages in id order');
    assert.equal(new Set(ids).size, ids.length, 'no duplicates');
    const missed = await waitForMessage(alice.page, 'missed 1');
    assert.equal(missed.from, 'deploy-bot');

    // the connection works again, both ways
    await say(alice.page, 'after 1');
    await waitForMessage(alice.page, 'after 1');
    await alice.page.waitForFunction(() => document.querySelector('#users li[data-name="alice"]') !== null);

    // second outage: more messages than the history keeps, so some are lost
    const many = Array.from({ length: HISTORY + 2 }, (_, i) => `lost or kept ${i + 1}`);
    await outage(alice.page, many);
    await alice.page.waitForFunction(() => document.getElementById('status').dataset.state === 'online',
      null, { timeout: 20_000 });
    await waitForMessage(alice.page, many.at(-1));
    const items = await listItems(alice.page);
    const kept = many.slice(-HISTORY);
    assert.deepEqual(items.slice(-(HISTORY + 2)), [
      `d:reconnected — ${HISTORY} missed messages`,
      'n:some messages could not be recovered',
      ...kept.map((t) => `m:${t}`),
    ]);
    const texts = await messageTexts(alice.page);
    assert.equal(new Set(texts).size, texts.length, 'no duplicates');

    assert.deepEqual(await problems(alice, OUTAGE_NOISE), []);
  } catch (err) {
    err.message += `\n${server.output()}\n${await describePages([alice])}`;
    throw err;
  } finally {
    await alice.context.close();
  }
});
