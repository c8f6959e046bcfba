// app.js — the wschat page: wires the connection (connection.js), the message list
// (messages.js), the sidebar lists (sidebar.js) and the typing indicator (typing.js) to the
// controls, and keeps the page's state: room, own name, members, private-message target.
// The wire protocol is described in docs/PROTOCOL.md.
//
// Elements the tests rely on (ids are stable):
//   #status        connection state; text "connecting" | "online" | "reconnecting in N s" |
//                  "offline"; attribute data-state = connecting | online | reconnecting | offline
//                  (and data-retry-at = ms epoch of the next attempt while reconnecting)
//   #retry         "retry now" button, shown while reconnecting / offline
//   #room-name     the current room, "#lobby"
//   #messages      the log (role=log, aria-live=polite). Children:
//                    li.message[data-id][data-from] with .from, .text, .time (HH:MM) and
//                      classes own (sent by us), private (either direction), cont (same sender
//                      as the message before: sender name hidden)
//                    li.notice (presence: "bob joined", "bob left", "guest-3 is now carol";
//                      li.notice.warning for "some messages could not be recovered")
//                    li.divider ("reconnected — N missed messages")
//   #new-messages  "new messages ↓" button, shown when the reader has scrolled up
//   #users         li[data-name] per member; others are button.name (click = private target);
//                  our own entry is li.own
//   #user-count    number of members
//   #rooms         li[data-room] per room, a button with .name "#room" and .count;
//                  the current room's button has aria-current="true"
//   #room-form / #room-input / #room-go   join or create a room by name
//   #typing        "bob is typing…" / "bob and carol are typing…" / empty
//   #nick          our name; change + Enter/blur. A typed name the server accepts is remembered
//                  in localStorage "wschat.nick" as a preference: a tab whose remembered name is
//                  taken (another tab has it) quietly takes a free variant (alice-2), shows no
//                  error and remembers nothing; errors are shown only for a name typed here
//   #error         the last error from the server (role=alert), cleared after a while
//   #to-chip       "to bob ✕" chip shown while a private target is set; #to-clear removes it
//   #input         the message box (textarea): Enter sends, Shift+Enter inserts a newline
//   #send          send button
//   #sidebar-toggle  shows / hides the sidebar on narrow screens

import { Connection } from './connection.js';
import { MessageList } from './messages.js';
import { renderRooms, renderUsers, sortNames } from './sidebar.js';
import { TypingSender, TypingView } from './typing.js';

const ROOM_RE = /^[A-Za-z0-9._-]{1,64}$/;
const NICK_KEY = 'wschat.nick';
const ROOMS_POLL_MS = 5000;
const ERROR_SHOW_MS = 8000;
const BASE_TITLE = 'wschat';
const NAME_MAX_CHARS = 32; // the server's limit (docs/PROTOCOL.md)
/** Free variants of a remembered name tried (name-2 ... name-5) before keeping the guest name;
 * within the server's burst of 5 name changes, so none is refused for its rate. */
const MAX_NAME_VARIANTS = 4;
/** Pages of older history (at most 1,000 messages or 1 MiB each) fetched when a welcome says
 * `more`: what one page load may ask of the server. */
const OLDER_PAGES = 16;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $('status'), retry: $('retry'), roomName: $('room-name'), messages: $('messages'),
  users: $('users'), userCount: $('user-count'), rooms: $('rooms'), roomForm: $('room-form'),
  roomInput: $('room-input'), typing: $('typing'), nickForm: $('nick-form'), nick: $('nick'),
  error: $('error'), toChip: $('to-chip'), toLabel: $('to-label'), toClear: $('to-clear'),
  composer: $('composer'), input: $('input'), sidebar: $('sidebar'), toggle: $('sidebar-toggle'),
};

const state = {
  config: null,          // {ws_url} from /config.json
  room: roomFromHash() || 'lobby', // the room shown
  serverRoom: null,      // the room the server last put us in
  inRoom: false,         // the list shows this room's history (next welcome = a reconnect)
  lastId: 0,             // highest id of a room message shown (for ?since= on reconnect)
  wantedName: readStoredNick(), // the name to ask for when (re)connecting
  nameTyped: false,      // wantedName was typed in this tab (errors about it are shown)
  nameVariants: 0,       // free variants of the remembered name tried so far
  pendingName: '',       // the name a nick frame asked for, not answered yet
  me: '',                // the name the server gave us
  users: [],             // members of the room, sorted (in a crowd, only some of them)
  userCount: 0,          // members of the room (more than users.length in a crowd)
  rooms: [],             // last answer of /api/rooms
  privateTo: null,       // name private messages go to, or null
  unread: 0,             // messages received while the tab was hidden
  lastSent: '',          // text of the last message sent (put back if the server refuses it)
  held: null,            // frames that arrived while older history was fetched (null: not fetching)
};

const list = new MessageList(ui.messages, $('new-messages'));
const typingView = new TypingView(ui.typing);
const typingSender = new TypingSender((active) => conn.send({ type: 'typing', active }));
const conn = new Connection({ url: connectUrl, onFrame: handleFrame, onState: showState, onClose: handleClose });

// ---- connecting ----------------------------------------------------------------------------

async function connectUrl() {
  if (!state.config) {
    const response = await fetch('/config.json', { cache: 'no-store' });
    if (!response.ok) throw new Error(`/config.json: HTTP ${response.status}`);
    state.config = await response.json();
  }
  // The room goes in the query (?room=), not the path (/chat/<room>): a CSP connect-src entry
  // with a path, like `ws://host:port/chat`, allows that exact path only, while the query is
  // never part of CSP matching, so this URL passes whichever form the server's policy uses.
  const params = new URLSearchParams({ room: state.room });
  // `guest-N` names are the server's to hand out (asking for one is refused): a guest
  // reconnects as a new guest.
  const name = state.wantedName || state.me;
  if (name && !/^guest-\d+$/.test(name)) params.set('name', name);
  if (state.inRoom && state.lastId > 0) params.set('since', String(state.lastId));
  return `${state.config.ws_url}?${params}`;
}

function showState(name, seconds, retryAt) {
  ui.status.dataset.state = name;
  if (name === 'reconnecting') {
    ui.status.textContent = `reconnecting in ${seconds} s`;
    ui.status.dataset.retryAt = String(retryAt);
  } else {
    ui.status.textContent = name;
    delete ui.status.dataset.retryAt;
  }
  ui.retry.hidden = !(name === 'reconnecting' || name === 'offline');
  ui.input.classList.toggle('disconnected', name !== 'online');
}

function handleClose(event) {
  state.config = null; // ask again before reconnecting: a restarted server may have moved
  state.pendingName = '';
  typingSender.reset();
  typingView.reset();
  if (event.code === 1008 || event.code === 1009) {
    showError(`disconnected by the server: ${event.reason || `code ${event.code}`}`);
  }
}

// ---- frames from the server ----------------------------------------------------------------

function handleFrame(frame) {
  if (state.held) {
    state.held.push(frame); // shown after the older history, so the list stays in id order
    return;
  }
  switch (frame.type) {
    case 'welcome': return onWelcome(frame);
    case 'room': return onRoom(frame);
    case 'message': return onMessage(frame);
    case 'joined': return onJoined(frame);
    case 'left': return onLeft(frame);
    case 'renamed': return onRenamed(frame);
    case 'presence': return onPresence(frame);
    case 'typing': return onTyping(frame);
    case 'error': return onError(frame);
    default: console.warn('wschat: unknown frame type', frame.type);
  }
}

function onWelcome(frame) {
  const reconnect = state.inRoom && frame.room === state.room;
  const since = reconnect ? state.lastId : 0; // what connectUrl asked for
  setMe(frame.name);
  if (frame.name === state.wantedName && state.nameTyped) rememberName(frame.name);
  state.serverRoom = frame.room;
  if (frame.room !== state.room) setRoom(frame.room);
  setUsers(frame.users, frame.count);
  withOlder(frame, since, (history) => {
    if (reconnect) {
      const missed = history.filter((m) => !list.has(m.id));
      list.addDivider(missed.length === 0
        ? 'reconnected — no missed messages'
        : `reconnected — ${missed.length} missed message${missed.length === 1 ? '' : 's'}`);
      if (frame.truncated) list.addNotice('some messages could not be recovered', 'warning');
      missed.forEach(showMessage);
    } else {
      list.clear();
      if (frame.truncated) list.addNotice('some messages could not be recovered', 'warning');
      history.forEach(showMessage);
    }
    resumeFrom(frame.last_id);
    state.inRoom = true;
    refreshRoomsSoon();
  });
}

/**
 * Calls `show` with the history of a welcome or room frame. When the frame says `more` (older
 * kept messages did not fit in it), fetches those first from the HTTP API and puts them before
 * it; frames arriving meanwhile wait in `state.held` and are handled after.
 */
function withOlder(frame, since, show) {
  const history = Array.isArray(frame.history) ? frame.history : [];
  if (!frame.more) {
    show(history);
    return;
  }
  state.held = [];
  const beforeId = history.length > 0 ? history[0].id : Infinity;
  fetchOlder(frame.room, since, beforeId)
    .catch((err) => {
      console.warn('wschat: older messages not loaded:', err);
      list.addNotice('older messages could not be loaded', 'warning');
      return [];
    })
    .then((older) => {
      show([...older, ...history]);
      const held = state.held;
      state.held = null;
      held.forEach(handleFrame);
    });
}

/** The kept messages of `room` after `since` and before `beforeId`, oldest first, paged
 * forward through `GET /api/rooms/<room>/messages` (docs/PROTOCOL.md, "Paging history"). */
async function fetchOlder(room, since, beforeId) {
  const older = [];
  let after = since;
  for (let page = 0; page < OLDER_PAGES; page += 1) {
    const query = new URLSearchParams({ since: String(after), limit: '1000' });
    const path = `/api/rooms/${encodeURIComponent(room)}/messages?${query}`;
    const response = await fetch(path, { cache: 'no-store' });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    const { messages = [], more } = await response.json();
    const wanted = messages.filter((m) => m.id < beforeId);
    older.push(...wanted);
    if (!more || wanted.length < messages.length || messages.length === 0) break;
    after = messages[messages.length - 1].id;
  }
  return older;
}

/** `last_id` of a welcome or room frame: what to pass as `since` (history may be empty). */
function resumeFrom(lastId) {
  if (Number.isInteger(lastId) && lastId > state.lastId) state.lastId = lastId;
}

function onRoom(frame) {
  state.serverRoom = frame.room;
  if (frame.room !== state.room) return; // an answer to a join we have since replaced
  list.clear();
  state.lastId = 0;
  setUsers(frame.users, frame.count);
  withOlder(frame, 0, (history) => {
    if (frame.truncated) list.addNotice('some messages could not be recovered', 'warning');
    history.forEach(showMessage);
    resumeFrom(frame.last_id);
    state.inRoom = true;
    refreshRoomsSoon();
  });
}

function onMessage(frame) {
  if (!frame.private && frame.room !== state.room) return; // from the room we just left
  typingView.set(frame.from, false);
  if (showMessage(frame) && frame.from !== state.me && document.visibilityState === 'hidden') {
    state.unread += 1;
    document.title = `(${state.unread}) ${BASE_TITLE}`;
  }
}

/** Adds a message to the list; tracks the highest room message id. */
function showMessage(msg) {
  const added = list.addMessage(msg, state.me);
  if (added && !msg.private && msg.id > state.lastId) state.lastId = msg.id;
  return added;
}

function isHere(frame) {
  return frame.room === state.room && state.serverRoom === state.room && state.inRoom;
}

function onJoined(frame) {
  if (!isHere(frame)) return;
  if (!state.users.includes(frame.name)) setUsers([...state.users, frame.name]);
  if (frame.name !== state.me) list.addNotice(`${frame.name} joined`);
  refreshRoomsSoon();
}

function onLeft(frame) {
  if (!isHere(frame)) return;
  setUsers(state.users.filter((n) => n !== frame.name));
  typingView.set(frame.name, false);
  list.addNotice(`${frame.name} left`);
  refreshRoomsSoon();
}

function onRenamed(frame) {
  if (frame.from === state.me) {
    setMe(frame.name);
    state.pendingName = '';
    if (state.nameTyped) rememberName(frame.name);
  }
  if (state.privateTo === frame.from) setPrivateTo(frame.name);
  if (!isHere(frame)) return;
  setUsers([...state.users.filter((n) => n !== frame.from), frame.name]);
  typingView.rename(frame.from, frame.name);
  const mine = frame.name === state.me;
  list.addNotice(mine ? `you are now ${frame.name}` : `${frame.from} is now ${frame.name}`);
}

/** A big room's member count (names are not sent one by one there); the whole list once the
 * room is small again. */
function onPresence(frame) {
  if (!isHere(frame)) return;
  setUsers(Array.isArray(frame.users) ? frame.users : state.users, frame.count);
  refreshRoomsSoon();
}

function onTyping(frame) {
  if (frame.room !== state.room || frame.name === state.me) return;
  typingView.set(frame.name, frame.active === true);
}

/** Errors that refuse the message we just sent: it goes back in the box to try again. */
const MESSAGE_ERRORS = new Set(['rate_limited', 'bad_text', 'no_such_user', 'empty_message']);

function onError(frame) {
  state.pendingName = ''; // whatever was refused, the same name may be asked for again
  if (frame.code === 'name_taken' || frame.code === 'bad_name') {
    if (!state.nameTyped) {
      takeFreeVariant(frame.code); // the remembered name: another tab of ours may have it
      return;
    }
    // keep the name the server gave us, also when reconnecting (localStorage keeps the wish
    // for the next visit)
    state.wantedName = state.me;
    ui.nick.value = state.me;
  }
  showError(frame.message || frame.code || 'error');
  if (MESSAGE_ERRORS.has(frame.code) && ui.input.value === '' && state.lastSent) {
    ui.input.value = state.lastSent;
  }
  if ((frame.code === 'bad_room' || frame.code === 'too_many_rooms') && state.serverRoom
      && state.serverRoom !== state.room) {
    switchRoom(state.serverRoom); // the join failed: go back where the server has us
  }
}

// ---- page state ----------------------------------------------------------------------------

function setMe(name) {
  state.me = name;
  if (document.activeElement !== ui.nick) ui.nick.value = name;
  drawUsers();
}

/** `count` is the room's size when the server lists only some of its members. */
function setUsers(names, count) {
  state.users = sortNames(Array.isArray(names) ? names : []);
  state.userCount = Math.max(Number.isInteger(count) ? count : 0, state.users.length);
  drawUsers();
}

function drawUsers() {
  let users = state.users;
  // A big room's list names only some members; we are there even if not among them.
  if (state.userCount > users.length && state.me && !users.includes(state.me)) {
    users = sortNames([...users, state.me]);
  }
  const more = state.userCount - users.length;
  renderUsers(ui.users, { users, more, me: state.me, privateTo: state.privateTo, onPick: pickUser });
  ui.userCount.textContent = String(state.userCount);
  drawRooms();
}

function pickUser(name) {
  setPrivateTo(state.privateTo === name ? null : name);
  closeSidebar();
  ui.input.focus();
}

function setPrivateTo(name) {
  state.privateTo = name;
  ui.toChip.hidden = !name;
  ui.toLabel.textContent = name ? `to ${name}` : '';
  ui.composer.classList.toggle('private', Boolean(name));
  drawUsers();
}

function setRoom(room) {
  state.room = room;
  ui.roomName.textContent = `#${room}`;
  if (roomFromHash() !== room) location.hash = room;
}

/** Shows another room: clears the list, then asks the server (or waits for the connection). */
function switchRoom(room) {
  if (!ROOM_RE.test(room)) {
    showError(`"${room}" is not a room name: use 1-64 letters, digits, - _ .`);
    setRoom(state.room);
    return;
  }
  if (room === state.room) return;
  typingSender.stop();
  typingView.reset();
  setRoom(room);
  state.inRoom = false;
  state.lastId = 0;
  list.clear();
  setUsers([]);
  conn.send({ type: 'join', room });
  closeSidebar();
}

function roomFromHash() {
  try {
    return decodeURIComponent(location.hash.slice(1));
  } catch {
    return '';
  }
}

function readStoredNick() {
  try {
    return localStorage.getItem(NICK_KEY) || '';
  } catch {
    return '';
  }
}

let errorTimer = null;
function showError(text) {
  ui.error.textContent = text;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => { ui.error.textContent = ''; }, ERROR_SHOW_MS);
}

// ---- rooms list ----------------------------------------------------------------------------

let roomsTimer = null;
async function refreshRooms() {
  clearTimeout(roomsTimer);
  roomsTimer = setTimeout(refreshRooms, ROOMS_POLL_MS);
  if (document.visibilityState === 'hidden') return;
  try {
    const response = await fetch('/api/rooms', { cache: 'no-store' });
    if (!response.ok) return;
    const body = await response.json();
    state.rooms = Array.isArray(body.rooms) ? body.rooms : [];
    drawRooms();
  } catch {
    // the server is away; the status line already says so
  }
}

/** Refreshes the room list shortly after presence changes (several changes, one request). */
let roomsSoonTimer = null;
function refreshRoomsSoon() {
  clearTimeout(roomsSoonTimer);
  roomsSoonTimer = setTimeout(refreshRooms, 300);
}

function drawRooms() {
  const rooms = state.rooms.filter((r) => r.name !== state.room);
  const known = state.rooms.find((r) => r.name === state.room);
  rooms.push({ name: state.room, count: state.inRoom ? state.userCount : known ? known.count : 0 });
  rooms.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  renderRooms(ui.rooms, { rooms, current: state.room, onPick: (room) => { location.hash = room; } });
}

// ---- controls ------------------------------------------------------------------------------

function sendMessage() {
  const text = ui.input.value;
  if (text.trim() === '') return;
  const frame = { type: 'message', text };
  if (state.privateTo) frame.to = state.privateTo;
  typingSender.stop();
  if (!conn.send(frame)) {
    showError('not connected: the message was not sent');
    return;
  }
  state.lastSent = text;
  ui.input.value = '';
  list.scrollToBottom();
  ui.input.focus();
}

/** The name field was changed. Enter fires both `change` and `submit`: one request per name. */
function applyNick() {
  const name = ui.nick.value.trim();
  if (name === '') {
    ui.nick.value = state.me;
    return;
  }
  if (name === state.me || name === state.pendingName) return;
  state.wantedName = name; // remembered once the server accepts it
  state.nameTyped = true;
  askForName(name); // offline: used on the next connect
}

/** The remembered name is taken or refused: quietly ask for name-2, name-3... and after
 * MAX_NAME_VARIANTS keep the name the server gave. Nothing is remembered or shown. */
function takeFreeVariant(code) {
  const base = readStoredNick();
  state.nameVariants += 1;
  if (code !== 'name_taken' || !base || state.nameVariants > MAX_NAME_VARIANTS) {
    state.wantedName = state.me;
    return;
  }
  const suffix = `-${state.nameVariants + 1}`;
  state.wantedName = [...base].slice(0, NAME_MAX_CHARS - suffix.length).join('') + suffix;
  askForName(state.wantedName);
}

function askForName(name) {
  if (conn.send({ type: 'nick', name })) state.pendingName = name;
}

/** Remembers a name the server accepted for the next visit. */
function rememberName(name) {
  try {
    localStorage.setItem(NICK_KEY, name);
  } catch {
    // private mode: the name is not remembered
  }
}

function closeSidebar() {
  ui.sidebar.classList.remove('open');
  ui.toggle.setAttribute('aria-expanded', 'false');
}

function wireControls() {
  ui.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    sendMessage();
  });
  ui.input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    }
  });
  ui.input.addEventListener('input', () => {
    if (ui.input.value.trim() === '') typingSender.stop();
    else typingSender.keystroke();
  });
  ui.input.addEventListener('blur', () => typingSender.stop());
  ui.toClear.addEventListener('click', () => {
    setPrivateTo(null);
    ui.input.focus();
  });

  ui.nickForm.addEventListener('submit', (event) => {
    event.preventDefault();
    applyNick();
  });
  ui.nick.addEventListener('change', applyNick);

  ui.roomForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const room = ui.roomInput.value.trim();
    if (!ROOM_RE.test(room)) {
      showError('a room name is 1-64 letters, digits, - _ .');
      return;
    }
    ui.roomInput.value = '';
    location.hash = room;
  });
  window.addEventListener('hashchange', () => switchRoom(roomFromHash() || 'lobby'));

  ui.retry.addEventListener('click', () => conn.retryNow());
  ui.toggle.addEventListener('click', () => {
    const open = ui.sidebar.classList.toggle('open');
    ui.toggle.setAttribute('aria-expanded', String(open));
  });
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && ui.sidebar.classList.contains('open')) {
      closeSidebar();
      ui.toggle.focus();
    }
  });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') {
      state.unread = 0;
      document.title = BASE_TITLE;
      refreshRooms();
    }
  });
}

function start() {
  if (!ROOM_RE.test(state.room)) {
    showError(`"${state.room}" is not a room name; showing #lobby`);
    state.room = 'lobby';
  }
  ui.roomName.textContent = `#${state.room}`;
  history.replaceState(null, '', `#${state.room}`);
  ui.nick.value = state.wantedName;
  wireControls();
  drawUsers();
  refreshRooms();
  conn.connect();
  ui.input.focus();
}

start();
