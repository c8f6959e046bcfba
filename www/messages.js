// messages.js — owns the message list (#messages): chat messages, presence notices and
// "reconnected" dividers; de-duplication by message id; grouping of consecutive messages
// from one sender; auto-scrolling and the "new messages ↓" button.
// All text from the network goes in with textContent, never as HTML.

const NEAR_BOTTOM_PX = 48;

export class MessageList {
  /**
   * @param {HTMLOListElement} list  the #messages element (it is also the scroll container)
   * @param {HTMLButtonElement} jumpButton  the "new messages ↓" button
   */
  constructor(list, jumpButton) {
    this.list = list;
    this.jumpButton = jumpButton;
    this.ids = new Set();      // ids of the messages shown, to drop duplicates
    this.lastGroup = null;     // sender key of the last message, for grouping
    list.addEventListener('scroll', () => { if (this.atBottom()) this.jumpButton.hidden = true; });
    jumpButton.addEventListener('click', () => this.scrollToBottom());
  }

  clear() {
    this.list.replaceChildren();
    this.ids.clear();
    this.lastGroup = null;
    this.jumpButton.hidden = true;
  }

  has(id) {
    return this.ids.has(id);
  }

  /**
   * Shows one chat message, unless a message with its id is already shown.
   * @param {object} msg  a server "message" frame
   * @param {string} me  our own name, to mark our messages
   * @returns {boolean} whether it was added
   */
  addMessage(msg, me) {
    if (typeof msg.id === 'number') {
      if (this.ids.has(msg.id)) return false;
      this.ids.add(msg.id);
    }
    const own = msg.from === me;
    const li = el('li', 'message');
    li.dataset.id = String(msg.id);
    li.dataset.from = msg.from;
    if (own) li.classList.add('own');
    if (msg.private) li.classList.add('private');

    const group = [msg.from, msg.private ? msg.to : ''].join('\n');
    if (group === this.lastGroup) li.classList.add('cont');
    this.lastGroup = group;

    const meta = el('span', 'meta');
    meta.append(el('span', 'from', msg.from));
    if (msg.private) {
      const target = own ? msg.to : 'you';
      meta.append(' ', el('span', 'to', `→ ${target} · private`));
    }
    const time = el('time', 'time', formatTime(msg.ts));
    if (Number.isFinite(msg.ts)) time.dateTime = new Date(msg.ts).toISOString();
    li.append(meta, el('div', 'text', msg.text), time);
    this.append(li, own);
    return true;
  }

  /** A one-line notice: "bob joined", errors about history, and so on. */
  addNotice(text, kind = 'presence') {
    const li = el('li', `notice ${kind}`, text);
    this.lastGroup = null;
    this.append(li, false);
  }

  /** A divider marking where a gap was (after a reconnect). */
  addDivider(text) {
    const li = el('li', 'divider', text);
    li.setAttribute('role', 'separator');
    this.lastGroup = null;
    this.append(li, false);
  }

  append(li, forceScroll) {
    const stick = forceScroll || this.atBottom();
    this.list.append(li);
    if (stick) this.scrollToBottom();
    else this.jumpButton.hidden = false;
  }

  atBottom() {
    const l = this.list;
    return l.scrollHeight - l.scrollTop - l.clientHeight < NEAR_BOTTOM_PX;
  }

  scrollToBottom() {
    this.list.scrollTop = this.list.scrollHeight;
    this.jumpButton.hidden = true;
  }
}

/** Creates an element with a class and (optionally) text, safely. */
function el(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Local time as HH:MM. */
export function formatTime(ts) {
  const d = Number.isFinite(ts) ? new Date(ts) : new Date();
  return `${String(d.getHours()).padStart(2, '0')}:${String(d.getMinutes()).padStart(2, '0')}`;
}
