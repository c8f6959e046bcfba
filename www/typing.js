// typing.js — owns the typing indicator, both ways:
//  * TypingSender decides when to tell the server that we are typing (at most one
//    "active:true" every 2 s while keys are pressed; "active:false" after 3 s idle or on stop()),
//    and never sends more than the server accepts (2 typing frames per second).
//  * TypingView keeps the set of people typing in the room and draws "bob is typing…" into
//    #typing; a name not refreshed for 6 s disappears on its own, as a safety net.

const REFRESH_MS = 2000;
const IDLE_MS = 3000;
const FORGET_MS = 6000;
const RATE_WINDOW_MS = 1100; // at most 2 frames in this time (the server allows 2 per second)

export class TypingSender {
  /** @param {(active: boolean) => void} send */
  constructor(send) {
    this.send = send;
    this.active = false;       // what we last told the server
    this.wanted = false;       // what we want to tell it
    this.lastRefresh = 0;
    this.sentAt = [];          // times of the last two frames sent
    this.idleTimer = null;
    this.flushTimer = null;
  }

  /** Call on every edit of the message box. */
  keystroke() {
    const now = Date.now();
    if (!this.wanted || now - this.lastRefresh >= REFRESH_MS) {
      this.lastRefresh = now;
      this.emit(true);
    }
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => this.stop(), IDLE_MS);
  }

  /** Call on send, on blur, when the box is emptied; sends active:false if needed. */
  stop() {
    clearTimeout(this.idleTimer);
    if (this.wanted) this.emit(false);
  }

  /** Forgets the state without telling the server (new connection or room). */
  reset() {
    clearTimeout(this.idleTimer);
    clearTimeout(this.flushTimer);
    this.flushTimer = null;
    this.active = this.wanted = false;
  }

  /**
   * The server accepts at most 2 typing frames per second and drops the rest silently, so a
   * frame that would be the third within a second waits; meanwhile only the newest wish counts.
   */
  emit(active) {
    this.wanted = active;
    if (this.flushTimer) return;
    const wait = this.sentAt.length < 2 ? 0 : this.sentAt[0] + RATE_WINDOW_MS - Date.now();
    if (wait <= 0) this.flush();
    else this.flushTimer = setTimeout(() => { this.flushTimer = null; this.flush(); }, wait);
  }

  flush() {
    if (!this.wanted && !this.active) return; // nothing to stop
    this.active = this.wanted;
    this.sentAt = [...this.sentAt, Date.now()].slice(-2);
    this.send(this.wanted);
  }
}

export class TypingView {
  /** @param {HTMLElement} node the #typing element */
  constructor(node) {
    this.node = node;
    this.timers = new Map(); // name -> safety-net timer
  }

  set(name, active) {
    clearTimeout(this.timers.get(name));
    if (active) this.timers.set(name, setTimeout(() => this.set(name, false), FORGET_MS));
    else this.timers.delete(name);
    this.render();
  }

  rename(from, to) {
    if (!this.timers.has(from)) return;
    this.set(from, false);
    this.set(to, true);
  }

  reset() {
    for (const timer of this.timers.values()) clearTimeout(timer);
    this.timers.clear();
    this.render();
  }

  render() {
    const names = [...this.timers.keys()].sort((a, b) => a.toLowerCase().localeCompare(b.toLowerCase()));
    this.node.textContent = typingPhrase(names);
  }
}

/** "bob is typing…", "bob and carol are typing…", "bob, carol and dave are typing…". */
export function typingPhrase(names) {
  if (names.length === 0) return '';
  if (names.length === 1) return `${names[0]} is typing…`;
  if (names.length > 3) return `${names.length} people are typing…`;
  return `${names.slice(0, -1).join(', ')} and ${names[names.length - 1]} are typing…`;
}
