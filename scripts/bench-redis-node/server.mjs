// One node of a socket.io 4 chat spread over several Node processes through Redis
// (@socket.io/redis-adapter, with the `redis` client): every `chat message` goes to every
// client of every node, the sender included. The baseline for wschat --redis in the benchmarks.
//
//   node server.mjs REDIS_URL [PORT]      (PORT 0 or absent: an ephemeral port)
//
// Listens on 127.0.0.1 only; prints "node-redis listening: http://127.0.0.1:PORT/" once its
// Redis links are up; exits on SIGTERM/SIGINT.
import { createServer } from 'node:http';
import { Server } from 'socket.io';
import { createAdapter } from '@socket.io/redis-adapter';
import { createClient } from 'redis';

const redisUrl = process.argv[2];
const port = Number.parseInt(process.argv[3] ?? '0', 10);
if (!redisUrl?.startsWith('redis://') || !Number.isInteger(port) || port < 0 || port > 65535) {
  console.error('usage: node server.mjs redis://HOST:PORT [PORT]');
  process.exit(2);
}

// The adapter publishes on one link and listens on another (a subscribed link can do nothing else).
const pub = createClient({ url: redisUrl });
const sub = pub.duplicate();
for (const link of [pub, sub]) {
  link.on('error', (err) => console.error(`node-redis: redis: ${err.message}`));
}
await Promise.all([pub.connect(), sub.connect()]);

// Nagle off on every connection, as wschat does; the same largest message as wschat's default.
const http = createServer({ noDelay: true });
const io = new Server(http, { maxHttpBufferSize: 64 * 1024, adapter: createAdapter(pub, sub) });

io.on('connection', (socket) => {
  socket.on('chat message', (msg) => io.emit('chat message', msg));
});

http.listen(port, '127.0.0.1', () => {
  console.log(`node-redis listening: http://127.0.0.1:${http.address().port}/`);
});
http.on('error', (err) => {
  console.error(`node-redis: ${err.message}`);
  process.exit(1);
});

const stop = () => {
  io.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
