// socketio.test.js — the socket.io tutorial's page (tests/socketio/page: a list, a form, `io()`
// with no URL) in one tab and wschat's own page in another, both served by one wschat on one
// port, chatting in the lobby both ways. The socket.io client script is npm's socket.io-client,
// served through --socketio-client (wschat ships none); tests/socketio's `npm ci` installs it.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  REPO, describePages, launchBrowser, openChat, problems, say, startServer, waitForMessage,
} from './harness.js';

const CLIENT_SCRIPT = path.join(REPO, 'tests', 'socketio', 'node_modules', 'socket.io-client', 'dist', 'socket.io.min.js');
const WAIT_MS = 10_000;

/** wschat's page at `/` and the tutorial's at `/tutorial/`, in a directory for --www. */
function siteWithTutorial() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wschat-sio-'));
  fs.cpSync(path.join(REPO, 'www'), dir, { recursive: true });
  fs.cpSync(path.join(REPO, 'tests', 'socketio', 'page'), path.join(dir, 'tutorial'), { recursive: true });
  return dir;
}

describe('the socket.io tutorial page', { timeout: 2 * 60_000 }, () => {
  let server;
  let browser;
  let site;

  before(async () => {
    if (!fs.existsSync(CLIENT_SCRIPT)) {
      throw new Error(`${CLIENT_SCRIPT} is missing: run \`npm ci\` in tests/socketio first`);
    }
    site = siteWithTutorial();
    server = await startServer({ args: ['--www', site, '--socketio-client', CLIENT_SCRIPT] });
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await server?.stop();
    if (site) fs.rmSync(site, { recursive: true, force: true });
  });

  test('chats with wschat\'s own page in another tab', { timeout: 60_000 }, async () => {
    const ada = await openChat(browser, server, { name: 'ada', room: 'lobby' });
    const context = await browser.newContext();
    const tutorial = await context.newPage();
    const errors = [];
    tutorial.on('pageerror', (err) => errors.push(err.message));
    tutorial.on('console', (msg) => {
      // A failed load is reported below with its URL (the browser's own favicon request aside).
      if (msg.type() === 'error' && !msg.text().startsWith('Failed to load resource')) errors.push(msg.text());
    });
    tutorial.on('response', (response) => {
      if (response.status() >= 400 && !response.url().endsWith('/favicon.ico')) {
        errors.push(`${response.status()} ${response.url()}`);
      }
    });
    try {
      await tutorial.goto(`${server.url}/tutorial/`, { timeout: WAIT_MS });
      // The tutorial page has no status line: it is connected once a message comes back.
      const shown = (text) => tutorial.waitForFunction(
        (t) => [...document.querySelectorAll('#messages li')].some((li) => li.textContent === t),
        text, { timeout: WAIT_MS },
      );
      await tutorial.waitForFunction(() => window.io !== undefined, null, { timeout: WAIT_MS });
      await tutorial.fill('#input', 'hello from the tutorial');
      await tutorial.press('#input', 'Enter');
      await shown('hello from the tutorial'); // io.emit includes the sender
      const seen = await waitForMessage(ada.page, 'hello from the tutorial');
      assert.match(seen.from, /^guest-/);

      await say(ada.page, 'hello from wschat');
      await shown('hello from wschat');
      assert.deepEqual(await problems(ada), []);
      assert.deepEqual(errors, []);
    } catch (err) {
      err.message += `\n${server.output()}\n${await describePages([ada])}`;
      throw err;
    } finally {
      await context.close().catch(() => {});
      await ada.context.close().catch(() => {});
    }
  });
});
