// chat.test.js — the chat page in a real Chromium against a real wschat server: messages both
// ways, presence, typing, rooms, private messages, escaping, the keyboard, grouping,
// scrolling, the unread count in the title, and no CSP violations or console errors.
// One server and one browser for the whole file; each test uses rooms of its own.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  describePages, launchBrowser, messageTexts, openChat, openTab, problems, say, sleep, startServer,
  userNames, waitForMessage, waitForText, waitForTextOf, waitForUsers, waitOnlineAs,
} from './harness.js';

const TEST_TIMEOUT = 60_000;

describe('wschat page', { timeout: 5 * 60_000 }, () => {
  let server;
  let browser;
  const chats = [];

  before(async () => {
    server = await startServer();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await server?.stop();
  });

  /** Opens a page and remembers it for the final "no errors" check. */
  async function open(name, room, options = {}) {
    const chat = await openChat(browser, server, { name, room, ...options });
    chats.push(chat);
    return chat;
  }

  /** Checks that the pages had no CSP violation nor console error, then closes them. */
  async function done(...pages) {
    for (const chat of pages) {
      chat.checked = true;
      assert.deepEqual(await problems(chat), [], `CSP violations or console errors on ${chat.name}'s page`);
      await chat.context.close();
    }
  }

  /** Runs a test body; on failure, adds the server's output to the error. */
  function check(name, body) {
    test(name, { timeout: TEST_TIMEOUT }, async () => {
      try {
        await body();
      } catch (err) {
        err.message += `\n${server.output()}\n${await describePages(chats.filter((c) => !c.checked))}`;
        throw err;
      }
    });
  }

  check('two people chat in both directions', async () => {
    const alice = await open('alice', 'duo');
    const bob = await open('bob', 'duo');
    await say(alice.page, 'hello bob');
    const seenByBob = await waitForMessage(bob.page, 'hello bob');
    assert.equal(seenByBob.from, 'alice');
    assert.match(seenByBob.time, /^\d\d:\d\d$/);
    assert.ok(!seenByBob.classes.includes('own'), 'alice\'s message is not bob\'s own');
    const seenByAlice = await waitForMessage(alice.page, 'hello bob');
    assert.ok(seenByAlice.classes.includes('own'), 'alice\'s message is marked own on her page');
    assert.equal(seenByAlice.id, seenByBob.id, 'same message id on both sides');

    await say(bob.page, 'hi alice');
    await waitForMessage(alice.page, 'hi alice');
    await waitForMessage(bob.page, 'hi alice');
    assert.deepEqual(await messageTexts(alice.page), ['hello bob', 'hi alice']);
    assert.deepEqual(await messageTexts(bob.page), ['hello bob', 'hi alice']);
    await done(alice, bob);
  });

  check('presence: joins, leaves and renames update the member list', async () => {
    const alice = await open('alice2', 'pres');
    await waitForUsers(alice.page, ['alice2']);
    const bob = await open('bob2', 'pres');
    await waitForUsers(alice.page, ['alice2', 'bob2']);
    await waitForUsers(bob.page, ['alice2', 'bob2']);
    await waitForText(alice.page, '#messages li.notice', 'bob2 joined');
    assert.equal(await alice.page.textContent('#user-count'), '2');
    // the room list (polled from /api/rooms) shows the room with its count
    await alice.page.waitForFunction(() => {
      const li = document.querySelector('#rooms li[data-room="pres"]');
      return li && li.querySelector('.count').textContent === '2'
        && li.querySelector('button').getAttribute('aria-current') === 'true';
    });

    // bob renames himself through the name field
    await bob.page.fill('#nick', 'robert');
    await bob.page.press('#nick', 'Enter');
    await waitForUsers(alice.page, ['alice2', 'robert']);
    await waitForText(alice.page, '#messages li.notice', 'bob2 is now robert');
    await waitForUsers(bob.page, ['alice2', 'robert']);
    assert.equal(await bob.page.evaluate(() => localStorage.getItem('wschat.nick')), 'robert');
    // Enter fires both `change` and `submit`: the name is still asked for once, and announced once
    await sleep(300);
    const nickFrames = bob.sentFrames.filter((f) => f.includes('"nick"'));
    assert.deepEqual(nickFrames, ['{"type":"nick","name":"robert"}']);
    const notices = (page) => page.$$eval('#messages li.notice', (nodes) => nodes.map((n) => n.textContent));
    assert.equal((await notices(bob.page)).filter((t) => t === 'you are now robert').length, 1);
    assert.equal((await notices(alice.page)).filter((t) => t === 'bob2 is now robert').length, 1);

    // a taken name (compared case-insensitively) is refused; the field keeps the server's name
    await bob.page.fill('#nick', 'ALICE2');
    await bob.page.press('#nick', 'Enter');
    await bob.page.waitForFunction(() => document.getElementById('error').textContent !== '');
    await bob.page.waitForFunction(() => document.getElementById('nick').value === 'robert');
    await waitForUsers(alice.page, ['alice2', 'robert']);
    assert.equal(await bob.page.evaluate(() => localStorage.getItem('wschat.nick')), 'robert', 'a refused name is not remembered');

    // bob closes his tab
    await done(bob);
    await waitForUsers(alice.page, ['alice2']);
    await waitForText(alice.page, '#messages li.notice', 'robert left');
    await done(alice);
  });

  check('two tabs of one browser: each its own name, both chat, no error shown', async () => {
    const first = await open('tabby', 'tabs');
    const second = { context: first.context, name: 'tabby (2nd tab)' };
    chats.push(second);
    // the second tab shares the first one's storage, so it asks for the remembered "tabby" too
    await openTab(second, server, { room: 'tabs' });
    await second.page.waitForFunction(() => document.getElementById('nick').value === 'tabby-2');
    await waitForUsers(first.page, ['tabby', 'tabby-2']);
    await say(second.page, 'from the second tab');
    await waitForMessage(first.page, 'from the second tab');
    await say(first.page, 'from the first tab');
    await waitForMessage(second.page, 'from the first tab');
    for (const page of [first.page, second.page]) {
      assert.deepEqual(await page.evaluate(() => window.__errorLines), [], 'no error line was shown');
    }
    assert.equal(await first.page.evaluate(() => localStorage.getItem('wschat.nick')), 'tabby',
      'the variant is not remembered over the name the user chose');
    // a reload of the second tab: still no error, still a name of its own
    await second.page.reload();
    await second.page.waitForFunction(() => document.getElementById('status').dataset.state === 'online'
      && /^tabby-\d$/.test(document.getElementById('nick').value));
    assert.deepEqual(await second.page.evaluate(() => window.__errorLines), []);
    second.checked = true;
    assert.deepEqual(await problems(second), [], 'CSP violations or console errors on the second tab');
    await done(first); // closes both tabs: they share a context
  });

  check('typing indicator appears on the other side and goes away', async () => {
    const alice = await open('alice3', 'typing');
    const bob = await open('bob3', 'typing');
    // typing then going idle: bob sees it, then it disappears by itself
    await alice.page.click('#input');
    await alice.page.keyboard.type('hel');
    await waitForTextOf(bob.page, '#typing', 'alice3 is typing…');
    assert.equal(await alice.page.textContent('#typing'), '', 'nobody is typing for alice');
    await waitForTextOf(bob.page, '#typing', '', 8000);

    // typing then sending: it disappears when the message arrives
    await alice.page.keyboard.type('lo');
    await waitForTextOf(bob.page, '#typing', 'alice3 is typing…');
    await alice.page.keyboard.press('Enter');
    await waitForMessage(bob.page, 'hello');
    await waitForTextOf(bob.page, '#typing', '', 2000);

    // two people typing
    const carol = await open('carol3', 'typing');
    await alice.page.keyboard.type('x');
    await carol.page.click('#input');
    await carol.page.keyboard.type('y');
    await waitForTextOf(bob.page, '#typing', 'alice3 and carol3 are typing…');
    // leaving the box (blur) stops it
    await alice.page.click('#messages');
    await carol.page.click('#messages');
    await waitForTextOf(bob.page, '#typing', '', 3000);
    await done(alice, bob, carol);
  });

  check('rooms are isolated; switching rooms by form, list and hash', async () => {
    const alice = await open('alice4', 'room-a');
    const bob = await open('bob4', 'room-b');
    await say(alice.page, 'only in A');
    await say(bob.page, 'only in B');
    await waitForMessage(alice.page, 'only in A');
    await waitForMessage(bob.page, 'only in B');
    await sleep(300);
    assert.deepEqual(await messageTexts(alice.page), ['only in A']);
    assert.deepEqual(await messageTexts(bob.page), ['only in B']);

    // bob moves to room-a with the form: the list is cleared, room-a's history shown
    await bob.page.fill('#room-input', 'room-a');
    await bob.page.press('#room-input', 'Enter');
    await waitForMessage(bob.page, 'only in A');
    assert.deepEqual(await messageTexts(bob.page), ['only in A']);
    assert.equal(new URL(bob.page.url()).hash, '#room-a');
    assert.equal(await bob.page.textContent('#room-name'), '#room-a');
    await waitForUsers(bob.page, ['alice4', 'bob4']);
    await waitForUsers(alice.page, ['alice4', 'bob4']);
    await waitForText(alice.page, '#messages li.notice', 'bob4 joined');

    // a message in room-a now reaches bob; one in room-b (from a third person) does not
    const carol = await open('carol4', 'room-b');
    await say(carol.page, 'B while bob is away');
    await say(alice.page, 'A with bob');
    await waitForMessage(bob.page, 'A with bob');
    await waitForMessage(carol.page, 'B while bob is away');
    await sleep(300);
    assert.deepEqual(await messageTexts(bob.page), ['only in A', 'A with bob']);

    // back to room-b by clicking it in the room list
    await bob.page.waitForSelector('#rooms li[data-room="room-b"] button');
    await bob.page.click('#rooms li[data-room="room-b"] button');
    await waitForMessage(bob.page, 'B while bob is away');
    assert.deepEqual(await messageTexts(bob.page), ['only in B', 'B while bob is away']);
    assert.equal(new URL(bob.page.url()).hash, '#room-b');
    await waitForUsers(alice.page, ['alice4']);

    // and by changing the hash
    await bob.page.evaluate(() => { location.hash = 'room-c'; });
    await waitOnlineAs(bob.page, 'bob4', 'room-c');
    await waitForUsers(bob.page, ['bob4']);
    assert.deepEqual(await messageTexts(bob.page), []);

    // a bad room name in the hash is refused on the page; bob stays where he is
    await bob.page.evaluate(() => { location.hash = 'no spaces!'; });
    await bob.page.waitForFunction(() => document.getElementById('error').textContent.includes('not a room name'));
    await bob.page.waitForFunction(() => location.hash === '#room-c');
    assert.equal(await bob.page.textContent('#room-name'), '#room-c');
    await say(bob.page, 'still in C');
    await waitForMessage(bob.page, 'still in C');
    await done(alice, bob, carol);
  });

  check('a private message reaches only its target', async () => {
    const alice = await open('alice5', 'priv');
    const bob = await open('bob5', 'priv');
    const carol = await open('carol5', 'priv');
    await waitForUsers(alice.page, ['alice5', 'bob5', 'carol5']);

    await alice.page.click('#users li[data-name="bob5"] button');
    assert.equal(await alice.page.isVisible('#to-chip'), true);
    assert.match(await alice.page.textContent('#to-chip'), /to bob5/);
    assert.equal(await alice.page.evaluate(() => document.activeElement.id), 'input');
    await alice.page.keyboard.type('secret for bob');
    await alice.page.keyboard.press('Enter');
    const atBob = await waitForMessage(bob.page, 'secret for bob');
    assert.ok(atBob.classes.includes('private'));
    assert.equal(atBob.from, 'alice5');
    const atAlice = await waitForMessage(alice.page, 'secret for bob');
    assert.ok(atAlice.classes.includes('private') && atAlice.classes.includes('own'));

    // remove the chip: the next message is public
    await alice.page.click('#to-clear');
    assert.equal(await alice.page.isVisible('#to-chip'), false);
    await say(alice.page, 'public again');
    await waitForMessage(carol.page, 'public again');
    const publicAtBob = await waitForMessage(bob.page, 'public again');
    assert.ok(!publicAtBob.classes.includes('private'));
    assert.deepEqual(await messageTexts(carol.page), ['public again'], 'carol never saw the secret');

    // a private message to someone who has gone: the error is shown, the text comes back
    await alice.page.click('#users li[data-name="carol5"] button');
    await done(carol);
    await waitForUsers(alice.page, ['alice5', 'bob5']);
    assert.match(await alice.page.textContent('#to-chip'), /to carol5/);
    await say(alice.page, 'carol, are you there?');
    await alice.page.waitForFunction(() => document.getElementById('error').textContent !== '');
    await alice.page.waitForFunction(() => document.getElementById('input').value === 'carol, are you there?');
    await done(alice, bob);
  });

  check('markup in a message is shown literally, never run', async () => {
    const alice = await open('alice6', 'xss');
    const bob = await open('bob6', 'xss');
    const evil = '<img src=x onerror=alert(1)>';
    await say(alice.page, evil);
    await waitForMessage(bob.page, evil);
    await waitForMessage(alice.page, evil);
    const evilName = '<b>mallory</b>';
    await bob.page.fill('#nick', evilName);
    await bob.page.press('#nick', 'Enter');
    await waitForUsers(alice.page, [evilName, 'alice6']);
    await say(bob.page, '<script>alert(2)</script>');
    await waitForMessage(alice.page, '<script>alert(2)</script>');
    await sleep(300);
    for (const chat of [alice, bob]) {
      assert.equal(await chat.page.$$eval('#messages img, #messages script, #messages b, #users b', (n) => n.length), 0);
      assert.deepEqual(chat.dialogs, [], 'no dialog opened');
    }
    await done(alice, bob);
  });

  check('keyboard: Enter sends, Shift+Enter adds a line, focus stays in the box', async () => {
    const alice = await open('alice7', 'keys');
    await alice.page.focus('#input');
    await alice.page.keyboard.type('line one');
    await alice.page.keyboard.press('Shift+Enter');
    await alice.page.keyboard.type('line two');
    assert.equal(await alice.page.inputValue('#input'), 'line one\nline two');
    await alice.page.keyboard.press('Enter');
    await waitForMessage(alice.page, 'line one\nline two');
    assert.equal(await alice.page.inputValue('#input'), '');
    assert.equal(await alice.page.evaluate(() => document.activeElement.id), 'input');
    // whitespace only is not sent
    await alice.page.keyboard.type('   ');
    await alice.page.keyboard.press('Enter');
    await alice.page.keyboard.press('Control+A');
    await alice.page.keyboard.press('Backspace');
    // the text keeps its line break on screen
    const whiteSpace = await alice.page.$eval('#messages li.message .text', (n) => getComputedStyle(n).whiteSpace);
    assert.equal(whiteSpace, 'pre-wrap');
    await say(alice.page, 'next');
    await waitForMessage(alice.page, 'next');
    assert.deepEqual(await messageTexts(alice.page), ['line one\nline two', 'next']);
    // every control has a label
    const unlabelled = await alice.page.$$eval('input, textarea, button', (nodes) => nodes
      .filter((n) => !(n.labels && n.labels.length) && !n.getAttribute('aria-label') && !n.textContent.trim())
      .map((n) => n.id || n.outerHTML));
    assert.deepEqual(unlabelled, []);
    assert.equal(await alice.page.getAttribute('#messages', 'role'), 'log');
    assert.equal(await alice.page.getAttribute('#messages', 'aria-live'), 'polite');
    await done(alice);
  });

  check('grouping, "new messages" button and unread count in the title', async () => {
    const bob = await open('bob8', 'scroll', { viewport: { width: 800, height: 500 } });
    // make the page believe it is hidden when we say so
    await bob.page.evaluate(() => {
      window.__hidden = false;
      Object.defineProperty(document, 'visibilityState', { get: () => (window.__hidden ? 'hidden' : 'visible') });
    });
    const alice = await open('alice8', 'scroll');
    for (let i = 1; i <= 3; i += 1) await say(alice.page, `group ${i}`);
    await waitForMessage(bob.page, 'group 3');
    const cont = await bob.page.$$eval('#messages li.message', (n) => n.map((li) => li.classList.contains('cont')));
    assert.deepEqual(cont, [false, true, true], 'sender shown once for consecutive messages');
    // the name is still there for screen readers, but takes no room on screen
    assert.ok(await bob.page.$eval('#messages li.message.cont .meta', (n) => n.getBoundingClientRect().width <= 1));
    assert.ok(await bob.page.$eval('#messages li.message:not(.cont) .meta', (n) => n.getBoundingClientRect().width > 10));

    // fill the list so that it scrolls; it follows the newest message
    const many = Array.from({ length: 25 }, (_, i) => `line ${i}\nsecond line`);
    for (const text of many) await say(alice.page, text);
    await waitForMessage(bob.page, many.at(-1));
    assert.ok(await bob.page.$eval('#messages', (l) => l.scrollHeight - l.scrollTop - l.clientHeight < 48), 'auto-scrolled');
    assert.equal(await bob.page.isVisible('#new-messages'), false);

    // scrolled up: no jump, the button appears; clicking it goes to the bottom
    await bob.page.$eval('#messages', (l) => { l.scrollTop = 0; });
    await say(alice.page, 'while scrolled up');
    await waitForMessage(bob.page, 'while scrolled up');
    assert.equal(await bob.page.$eval('#messages', (l) => l.scrollTop), 0);
    await bob.page.waitForSelector('#new-messages', { state: 'visible' });
    await bob.page.click('#new-messages');
    await bob.page.waitForSelector('#new-messages', { state: 'hidden' });
    assert.ok(await bob.page.$eval('#messages', (l) => l.scrollHeight - l.scrollTop - l.clientHeight < 48));

    // hidden tab: "(N) wschat"; visible again: "wschat"
    await bob.page.evaluate(() => { window.__hidden = true; document.dispatchEvent(new Event('visibilitychange')); });
    await say(alice.page, 'unread 1');
    await say(alice.page, 'unread 2');
    await waitForMessage(bob.page, 'unread 2');
    assert.equal(await bob.page.title(), '(2) wschat');
    await bob.page.evaluate(() => { window.__hidden = false; document.dispatchEvent(new Event('visibilitychange')); });
    assert.equal(await bob.page.title(), 'wschat');
    await done(alice, bob);
  });

  test('no CSP violations and no console errors on any page', async () => {
    assert.ok(chats.length > 10);
    for (const chat of chats) {
      if (!chat.checked) assert.deepEqual(await problems(chat), [], `problems on ${chat.name}'s page`);
    }
  });
});
