// The socket.io tutorial's chat server, as the baseline for wschat's socket.io path in the
// benchmarks: every `chat message` goes to every connected client, the sender included.
//
//   node server.mjs [PORT]      (PORT 0 or absent: an ephemeral port)
//
// Listens on 127.0.0.1 only; prints "node-socketio listening: http://127.0.0.1:PORT/" once
// ready; exits on SIGTERM/SIGINT. Both transports are on, as in the tutorial.
import { createServer } from 'node:http';
import { Server } from 'socket.io';

const port = Number.parseInt(process.argv[2] ?? '0', 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`usage: node server.mjs [PORT]   (got ${process.argv[2]})`);
  process.exit(2);
}

// Nagle off on every connection (WebSocket upgrades included), as wschat does.
const http = createServer({ noDelay: true });
// The same largest message as wschat's default --max-message-bytes.
const io = new Server(http, { maxHttpBufferSize: 64 * 1024 });

io.on('connection', (socket) => {
  socket.on('chat message', (msg) => io.emit('chat message', msg));
});

http.listen(port, '127.0.0.1', () => {
  console.log(`node-socketio listening: http://127.0.0.1:${http.address().port}/`);
});
http.on('error', (err) => {
  console.error(`node-socketio: ${err.message}`);
  process.exit(1);
});

const stop = () => {
  io.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
