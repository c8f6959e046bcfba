// A room bigger than --presence-limit (a "crowd"): the server sends counts instead of every
// join and leave, and the page shows the names it has plus "and N more".
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { launchBrowser, openChat, problems, startServer, waitForUsers } from './harness.js';

describe('wschat page in a crowd', { timeout: 2 * 60_000 }, () => {
  let server;
  let browser;

  before(async () => {
    server = await startServer({ args: ['--presence-limit', '1'] });
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await server?.stop();
  });

  /** The member list as the page draws it: names, then the "and N more" line if any. */
  function drawnList(page) {
    return page.$$eval('#users li', (nodes) => nodes.map((n) => n.dataset.name || n.textContent));
  }

  async function waitForList(page, want, count) {
    try {
      await page.waitForFunction(({ want, count }) => {
        const drawn = [...document.querySelectorAll('#users li')].map((n) => n.dataset.name || n.textContent);
        return JSON.stringify(drawn) === JSON.stringify(want)
          && document.getElementById('user-count').textContent === count;
      }, { want, count });
    } catch (err) {
      err.message += `\ndrawn: ${JSON.stringify(await drawnList(page))}, count ${await page.textContent('#user-count')}\n${server.output()}`;
      throw err;
    }
  }

  test('counts instead of names, and the whole list once the room is small again', async () => {
    const first = await openChat(browser, server, { name: 'c1', room: 'crowd' });
    await waitForUsers(first.page, ['c1']);
    const second = await openChat(browser, server, { name: 'c2', room: 'crowd' });
    const third = await openChat(browser, server, { name: 'c3', room: 'crowd' });
    // the newcomer sees the longest-present member, itself, and how many more
    await waitForList(third.page, ['c1', 'c3', 'and 1 more'], '3');
    // the first member hears counts (within the server's one-second tick), no names
    await waitForList(first.page, ['c1', 'and 2 more'], '3');
    const notices = await first.page.$$eval('#messages li.notice', (nodes) => nodes.map((n) => n.textContent));
    assert.ok(!notices.some((t) => /c[23] joined/.test(t)), `no per-member notices in a crowd: ${notices}`);

    for (const chat of [second, third]) {
      assert.deepEqual(await problems(chat), []);
      await chat.context.close();
    }
    await waitForList(first.page, ['c1'], '1');
    assert.deepEqual(await problems(first), []);
    await first.context.close();
  });
});
