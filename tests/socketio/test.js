// The socket.io tutorial's chat test, written anew for wschat: socket.io 4 clients (both
// transports) and raw WebSocket clients chat through one wschat server, started from WSCHAT_BIN.
//
//   cd tests/socketio && npm ci && WSCHAT_BIN=../../target/debug/wschat npm test
//
// Every test uses a room of its own, so no test hears another's messages, and every wait has a
// time bound (mocha's --timeout, and `next()` below).

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import should from 'should';
import { io } from 'socket.io-client';
import WebSocket from 'ws';

const REPO = path.resolve(fileURLToPath(new URL('../..', import.meta.url)));
const BIN = process.env.WSCHAT_BIN || path.join(REPO, 'target', 'debug', 'wschat');
// The first line wschat prints: "wschat listening: http://HOST:PORT/" (more may follow).
const LISTENING = /wschat listening: (http:\/\/[^\s/]+)\//;
const START_TIMEOUT_MS = 10_000;
// socket.io's own client script, which wschat serves at /socket.io/socket.io.js (it ships none).
const CLIENT_SCRIPT = path.join(REPO, 'tests', 'socketio', 'node_modules', 'socket.io-client', 'dist', 'socket.io.min.js');
const WAIT_MS = 5_000;

let server;
let roomCount = 0;
const open = [];

/** A room name no other test uses. */
function freshRoom() {
  roomCount += 1;
  return `sio-${process.pid}-${roomCount}`;
}

/** Starts wschat on a free port; resolves with its base URL and a stop function. */
async function startServer() {
  if (!fs.existsSync(BIN)) {
    throw new Error(`wschat binary not found at ${BIN}: run \`cargo build\` first (or set WSCHAT_BIN)`);
  }
  const child = spawn(BIN, ['--port', '0', '--socketio-client', CLIENT_SCRIPT], {
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  child.stdout.setEncoding('utf8');
  const url = await new Promise((resolve, reject) => {
    let stdout = '';
    const timer = setTimeout(() => reject(new Error(`no "listening" line within ${START_TIMEOUT_MS} ms: ${stdout}`)), START_TIMEOUT_MS);
    child.stdout.on('data', (chunk) => {
      stdout += chunk;
      const match = LISTENING.exec(stdout);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`wschat exited early with ${code}: ${stdout}`));
    });
  });
  const stop = () => new Promise((resolve) => {
    if (child.exitCode !== null) return resolve();
    child.once('exit', resolve);
    child.kill('SIGTERM');
    setTimeout(() => child.kill('SIGKILL'), 3000).unref();
  });
  return { url, stop };
}

/** A socket.io client of the server (no reconnection: a drop fails the test). */
function sio(options = {}) {
  const socket = io(server.url, { forceNew: true, reconnection: false, ...options });
  socket.on('connect_error', (err) => { socket.lastError = err; });
  open.push(() => socket.close());
  return socket;
}

/** A raw WebSocket client of the same server, in `room`. */
function raw(room, name) {
  const ws = new WebSocket(`${server.url.replace('http', 'ws')}/chat/${room}?name=${name}`);
  ws.on('error', (err) => { ws.lastError = err; });
  open.push(() => ws.terminate());
  return ws;
}

/** The arguments of the next `event` on `emitter`, or a rejection after WAIT_MS. */
function next(emitter, event, accept = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, listener);
      const cause = emitter.lastError ? ` (last error: ${emitter.lastError.message})` : '';
      reject(new Error(`no "${event}" within ${WAIT_MS} ms${cause}`));
    }, WAIT_MS);
    function listener(...args) {
      if (!accept(...args)) return;
      clearTimeout(timer);
      emitter.off(event, listener);
      resolve(args);
    }
    emitter.on(event, listener);
  });
}

/** Resolves once `predicate()` holds, checking every 20 ms; rejects after WAIT_MS. */
async function eventually(predicate, what) {
  const deadline = Date.now() + WAIT_MS;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`no ${what} within ${WAIT_MS} ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Emits a chat message and resolves with the `chat message` that brings it back. */
function emitAndHear(client, text) {
  const heard = next(client, 'chat message', (t) => t === text);
  client.emit('chat message', text);
  return heard;
}

/** The next JSON frame of type `type` a raw client receives. */
async function nextFrame(ws, type, accept = () => true) {
  const [data] = await next(ws, 'message', (bytes) => {
    const frame = JSON.parse(bytes.toString());
    return frame.type === type && accept(frame);
  });
  return JSON.parse(data.toString());
}

before(async () => {
  server = await startServer();
});

after(async () => {
  if (server) await server.stop();
});

afterEach(() => {
  while (open.length) open.pop()();
});

describe('the tutorial chat, as a socket.io client sees it', () => {
  it('echoes a chat message with the default transports (polling, then the upgrade)', async () => {
    const client = sio({ auth: { room: freshRoom() } });
    await next(client, 'connect');
    client.emit('chat message', 'hello world');
    const [msg] = await next(client, 'chat message');
    should(msg).equal('hello world');
    await eventually(() => client.io.engine.transport.name === 'websocket', 'the upgrade to websocket');
    const [again] = await emitAndHear(client, 'after the upgrade');
    should(again).equal('after the upgrade');
  });

  it('echoes a chat message with transports: ["websocket"]', async () => {
    const client = sio({ transports: ['websocket'], auth: { room: freshRoom() } });
    client.emit('chat message', 'hello world');
    const [msg] = await next(client, 'chat message');
    should(msg).equal('hello world');
    should(client.io.engine.transport.name).equal('websocket');
  });

  it('lets two clients see each other\'s messages, sender included', async () => {
    const room = freshRoom();
    const alice = sio({ auth: { room, name: 'alice' } });
    const bob = sio({ transports: ['websocket'], auth: { room, name: 'bob' } });
    await Promise.all([next(alice, 'welcome'), next(bob, 'welcome')]);
    const bobHears = next(bob, 'chat message');
    const aliceHears = next(alice, 'chat message');
    alice.emit('chat message', 'hi bob');
    should((await bobHears)[0]).equal('hi bob');
    should((await aliceHears)[0]).equal('hi bob');
    const aliceHearsBob = next(alice, 'chat message', (text) => text === 'hi alice');
    bob.emit('chat message', 'hi alice');
    should((await aliceHearsBob)[0]).equal('hi alice');
  });

  it('shares rooms with raw WebSocket clients, both ways', async () => {
    const room = freshRoom();
    const ws = raw(room, 'rawley');
    await nextFrame(ws, 'welcome');
    const client = sio({ auth: { room, name: 'sio' } });
    await next(client, 'welcome');

    const rawHears = nextFrame(ws, 'message', (m) => m.from === 'sio');
    client.emit('chat message', 'from socket.io');
    const frame = await rawHears;
    should(frame).containDeep({ type: 'message', room, from: 'sio', text: 'from socket.io' });
    should(frame.id).be.a.Number();

    const sioHears = next(client, 'chat message', (text) => text === 'from raw');
    ws.send('from raw');
    should((await sioHears)[0]).equal('from raw');
  });
});

describe('the client script', () => {
  it('is the file --socketio-client names, at /socket.io/socket.io.js', async () => {
    const response = await fetch(`${server.url}/socket.io/socket.io.js`);
    should(response.status).equal(200);
    should(await response.text()).equal(fs.readFileSync(CLIENT_SCRIPT, 'utf8'));
  });
});

describe('the richer events', () => {
  it('welcomes with the name, room and history, and tells of arrivals', async () => {
    const room = freshRoom();
    const first = sio({ auth: { room, name: 'ada' } });
    const [welcome] = await next(first, 'welcome');
    should(welcome).containDeep({ type: 'welcome', name: 'ada', room, users: ['ada'] });
    first.emit('chat message', 'before you came');
    await next(first, 'chat message');

    const joined = next(first, 'joined');
    const second = sio({ auth: { room, name: 'grace' } });
    const [secondWelcome] = await next(second, 'welcome');
    should(secondWelcome.history.map((m) => m.text)).eql(['before you came']);
    should((await joined)[0]).containDeep({ type: 'joined', name: 'grace', count: 2 });
  });

  it('gives the whole message object to clients that ask with full: true', async () => {
    const client = sio({ auth: { room: freshRoom(), name: 'lin', full: true } });
    client.emit('chat message', 'with details');
    const [text, message] = await next(client, 'chat message');
    should(text).equal('with details');
    should(message).containDeep({ type: 'message', from: 'lin', text: 'with details' });
  });

  it('acknowledges an accepted event and answers a bad one with an error event', async () => {
    const client = sio({ auth: { room: freshRoom() } });
    await next(client, 'connect');
    const acked = new Promise((resolve) => client.emit('nick', 'turing', resolve));
    await acked;
    client.emit('join', 'not a room!');
    const [error] = await next(client, 'error');
    should(error).containDeep({ type: 'error', code: 'bad_room' });
    should(client.connected).be.true();
  });

  it('refuses other namespaces with connect_error', async () => {
    const admin = io(`${server.url}/admin`, { forceNew: true, reconnection: false });
    open.push(() => admin.close());
    const [err] = await next(admin, 'connect_error');
    should(err.message).match(/namespace/);
  });
});
