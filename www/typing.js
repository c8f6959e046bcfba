// typing.js — owns the typing indicator, both ways:
//  * TypingSender decides when to tell the server that we are typing (at most one
//    "active:true" every 2 s while keys are pressed; "active:false" after 3 s idle or on stop()).
//  * TypingView keeps the set of people typing in the room and draws "bob is typing…" into
//    #typing; a name not refreshed for 6 s disappears on its own, as a safety net.

const REFRESH_MS = 2000;
const IDLE_MS = 3000;
const FORGET_MS = 6000;

export class TypingSender {
  /** @param {(active: boolean) => void} send */
  constructor(send) {
    this.send = send;
    this.active = false;
    this.lastSent = 0;
    this.idleTimer = null;
  }

  /** Call on every edit of the message box. */
  keystroke() {
    const now = Date.now();
    if (!this.active || now - this.lastSent >= REFRESH_MS) {
      this.active = true;
      this.lastSent = now;
      this.send(true);
    }
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => this.stop(), IDLE_MS);
  }

  /** Call on send, on blur, when the box is emptied; sends active:false if needed. */
  stop() {
    clearTimeout(this.idleTimer);
    if (!this.active) return;
    this.active = false;
    this.send(false);
  }

  /** Forgets the state without telling the server (new connection or room). */
  reset() {
    clearTimeout(this.idleTimer);
    this.active = false;
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
    this.node.textContent = typingPhrase([...this.timers.keys()]);
  }
}

/** "bob is typing…", "bob and carol are typing…", "bob, carol and dave are typing…". */
export function typingPhrase(names) {
  if (names.length === 0) return '';
  if (names.length === 1) return `${names[0]} is typing…`;
  if (names.length > 3) return `${names.length} people are typing…`;
  return `${names.slice(0, -1).join(', ')} and ${names[names.length - 1]} are typing…`;
}
