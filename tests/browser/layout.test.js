// layout.test.js — the page at 360 px wide (phone) and 1280x800 (desktop), light and dark:
// nothing sticks out sideways, the sidebar folds behind a toggle on the phone, and
// screenshots go to <repo>/target/screenshots/ for a human to look at.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  SCREENSHOTS, describePages, launchBrowser, openChat, problems, say, startServer,
  waitForMessage, waitForTextOf, waitForUsers,
} from './harness.js';

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
  fs.mkdirSync(SCREENSHOTS, { recursive: true });
});

after(async () => {
  await browser?.close().catch(() => {});
  await server?.stop();
});

/** Fills the room "lobby" with a little conversation seen by both pages. */
async function converse(phone, desktop, other) {
  await say(desktop.page, 'Hi! Anyone around?');
  await say(phone.page, 'yes — on my phone');
  await say(phone.page, 'a long word: Donaudampfschifffahrtsgesellschaftskapitänswitwenrentenversicherung');
  await say(desktop.page, 'multi-line\n  indented line\nlast line');
  await say(other.page, '<img src=x onerror=alert(1)> is shown as text');
  await other.page.click('#users li[data-name="sam"] button');
  await say(other.page, 'psst, private for sam');
  await other.page.click('#to-clear');
  await waitForMessage(phone.page, 'psst, private for sam');
  await waitForMessage(desktop.page, '<img src=x onerror=alert(1)> is shown as text');
  // someone types on the desktop: the phone shows it
  await desktop.page.click('#input');
  await desktop.page.keyboard.type('typing away');
  await waitForTextOf(phone.page, '#typing', 'taylor is typing…');
}

test('phone and desktop layouts, light and dark', { timeout: 90_000 }, async () => {
  const desktop = await openChat(browser, server, { name: 'taylor', viewport: { width: 1280, height: 800 } });
  const phone = await openChat(browser, server, { name: 'sam', viewport: { width: 360, height: 740 } });
  const other = await openChat(browser, server, { name: 'robin-with-a-rather-long-name' });
  const all = [desktop, phone, other];
  try {
    await waitForUsers(desktop.page, ['robin-with-a-rather-long-name', 'sam', 'taylor']);
    await converse(phone, desktop, other);

    // phone: no sideways scrolling; the sidebar is folded behind the toggle
    const overflow = await phone.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the page is ${overflow} px wider than the 360 px screen`);
    assert.equal(await phone.page.isVisible('#sidebar'), false);
    assert.equal(await phone.page.isVisible('#sidebar-toggle'), true);
    for (const id of ['#input', '#send', '#status', '#messages']) {
      assert.equal(await phone.page.isVisible(id), true, `${id} visible on the phone`);
    }
    await phone.page.screenshot({ path: path.join(SCREENSHOTS, 'mobile.png') });

    await phone.page.click('#sidebar-toggle');
    assert.equal(await phone.page.getAttribute('#sidebar-toggle', 'aria-expanded'), 'true');
    await phone.page.waitForSelector('#users', { state: 'visible' });
    assert.equal(await phone.page.isVisible('#nick'), true);
    await phone.page.screenshot({ path: path.join(SCREENSHOTS, 'mobile-sidebar.png') });
    await phone.page.keyboard.press('Escape');
    await phone.page.waitForSelector('#sidebar', { state: 'hidden' });

    // desktop: sidebar and chat side by side
    assert.equal(await desktop.page.isVisible('#sidebar'), true);
    assert.equal(await desktop.page.isVisible('#sidebar-toggle'), false);
    const [side, chat] = await desktop.page.$$eval(['#sidebar', '.chat'].join(','),
      (nodes) => nodes.map((n) => n.getBoundingClientRect().toJSON()));
    assert.ok(side.right <= chat.left + 1, 'sidebar left of the chat');
    await desktop.page.screenshot({ path: path.join(SCREENSHOTS, 'desktop.png') });

    // dark colour scheme
    await desktop.page.emulateMedia({ colorScheme: 'dark' });
    const background = await desktop.page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    assert.notEqual(background, 'rgb(246, 247, 249)', 'dark background in dark mode');
    await desktop.page.screenshot({ path: path.join(SCREENSHOTS, 'desktop-dark.png') });
    await phone.page.emulateMedia({ colorScheme: 'dark' });
    await phone.page.screenshot({ path: path.join(SCREENSHOTS, 'mobile-dark.png') });

    for (const chat of all) {
      assert.deepEqual(await problems(chat), [], `CSP violations or console errors on ${chat.name}'s page`);
      assert.deepEqual(chat.dialogs, []);
    }

    // the server goes away: the phone's header shows the countdown and still fits
    await phone.page.emulateMedia({ colorScheme: 'light' });
    await server.stop();
    await phone.page.waitForFunction(() => document.getElementById('status').dataset.state === 'reconnecting');
    assert.equal(await phone.page.isVisible('#retry'), true);
    const overflowAway = await phone.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflowAway <= 0, `while reconnecting the page is ${overflowAway} px too wide`);
    await phone.page.screenshot({ path: path.join(SCREENSHOTS, 'mobile-reconnecting.png') });
  } catch (err) {
    err.message += `\n${server.output()}\n${await describePages(all)}`;
    throw err;
  } finally {
    for (const chat of all) await chat.context.close();
  }
});
