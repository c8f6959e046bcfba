import { startServer, launchBrowser, openChat, say, waitForMessage } from './harness.js';
const s = await startServer(); const b = await launchBrowser();
const c = await openChat(b, s, { name: 'alice', room: 'x' });
await say(c.page, 'one'); await say(c.page, 'two'); await waitForMessage(c.page, 'two');
console.log(await c.page.evaluate(() => [...document.querySelectorAll('#messages .from')].map(n => JSON.stringify(n.getBoundingClientRect()))));
await c.page.screenshot({path: '/tmp/dbg.png'});
await b.close(); await s.stop();
