import { startServer, launchBrowser, openChat, say, waitForMessage } from './harness.js';
const s = await startServer(); const b = await launchBrowser();
let t = Date.now(); const lap = (m) => { console.log(m, Date.now() - t); t = Date.now(); };
const a = await openChat(b, s, { name: 'alice', room: 'x' }); lap('alice open');
const ctx = await b.newContext(); const p = await ctx.newPage();
p.on('request', r => console.log('  req', r.url(), Date.now() - t)); p.on('requestfinished', r => console.log('  done', r.url(), Date.now() - t));
await p.goto(s.url + '/#x'); lap('bob goto');
await b.close(); await s.stop(); console.log(s.output().slice(-1500));
