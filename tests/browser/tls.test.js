// tls.test.js — the page over https and two people chatting over wss, in a real Chromium
// against wschat started with --tls-cert/--tls-key. The certificate is made for this run with
// Debian's openssl (self-signed, for localhost and 127.0.0.1); Chromium is told to accept it.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { launchBrowser, openChat, problems, say, startServer, waitForMessage } from './harness.js';

/** A self-signed EC certificate for localhost and 127.0.0.1, valid for two days. */
function makeCertificate(dir) {
  const cert = path.join(dir, 'server.crt');
  const key = path.join(dir, 'server.key');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-days', '2', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-keyout', key, '-out', cert,
  ], { stdio: 'ignore', timeout: 10_000 });
  return { cert, key };
}

describe('wschat over TLS', { timeout: 2 * 60_000 }, () => {
  let dir;
  let server;
  let browser;

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wschat-tls-'));
    const { cert, key } = makeCertificate(dir);
    server = await startServer({ args: ['--tls-cert', cert, '--tls-key', key] });
    browser = await launchBrowser({ args: ['--ignore-certificate-errors'] });
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await server?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the page loads over https and two pages chat over wss', { timeout: 60_000 }, async () => {
    try {
      assert.match(server.url, /^https:\/\//);
      assert.match(server.wsUrl, /^wss:\/\//);
      const alice = await openChat(browser, server, { name: 'alice', room: 'secure' });
      const bob = await openChat(browser, server, { name: 'bob', room: 'secure' });
      assert.equal(await alice.page.evaluate(() => window.isSecureContext), true);
      await say(alice.page, 'hello over tls');
      assert.equal((await waitForMessage(bob.page, 'hello over tls')).from, 'alice');
      await say(bob.page, 'and back');
      await waitForMessage(alice.page, 'and back');
      for (const chat of [alice, bob]) {
        assert.deepEqual(await problems(chat), [], `console errors on ${chat.name}'s page`);
        await chat.context.close();
      }
    } catch (err) {
      err.message += `\n${server.output()}`;
      throw err;
    }
  });
});
