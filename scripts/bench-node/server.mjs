// Minimal room-less WebSocket broadcast server used as a baseline by scripts/bench.
//
//   node server.mjs [PORT] [CERT KEY]    (PORT 0 or absent: an ephemeral port)
//
// With CERT and KEY (PEM files), it terminates TLS itself with Node's `https` module and serves
// wss:// instead: the baseline for wschat's --tls-cert/--tls-key, with the same certificate.
// Listens on 127.0.0.1 only, accepts any path, and sends every text frame it receives to every
// connected client, the sender included, unchanged (no envelope). Binary frames are ignored.
// Prints "node-ws listening: ws://127.0.0.1:PORT/" on stdout once it is ready; exits on
// SIGTERM/SIGINT. Meant to be driven by `wschat-load --raw`.
import fs from 'node:fs';
import https from 'node:https';
import { WebSocketServer } from 'ws';

const port = Number.parseInt(process.argv[2] ?? '0', 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`usage: node server.mjs [PORT]   (got ${process.argv[2]})`);
  process.exit(2);
}

const [certFile, keyFile] = process.argv.slice(3);
const tls = certFile && keyFile
  ? https.createServer({ cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile) })
  : null;

const wss = new WebSocketServer({
  ...(tls ? { server: tls } : { host: '127.0.0.1', port, backlog: 4096 }),
  perMessageDeflate: false,
  clientTracking: true,
  maxPayload: 64 * 1024,
});

wss.on('connection', (ws, req) => {
  // Disable Nagle like wschat does, so both servers are compared on equal terms.
  req.socket.setNoDelay(true);
  ws.on('message', (data, isBinary) => {
    if (isBinary) return;
    for (const client of wss.clients) {
      if (client.readyState === 1 /* OPEN */) client.send(data, { binary: false });
    }
  });
  ws.on('error', () => {});
});

const announce = (address) => {
  const scheme = tls ? 'wss' : 'ws';
  console.log(`node-ws listening: ${scheme}://127.0.0.1:${address.port}/`);
};
if (tls) {
  tls.listen({ host: '127.0.0.1', port, backlog: 4096 }, () => announce(tls.address()));
} else {
  wss.on('listening', () => announce(wss.address()));
}

wss.on('error', (err) => {
  console.error(`node-ws: ${err.message}`);
  process.exit(1);
});

const stop = () => {
  for (const client of wss.clients) client.terminate();
  wss.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
