// connection.js — owns the WebSocket: opening it, parsing incoming frames, sending frames,
// and reconnecting after a drop (exponential backoff with jitter, capped; reset once the
// connection has been stable for a while). It reports its state to whoever created it:
// "connecting", "online", "reconnecting" (with the seconds left) and "offline".

const FIRST_DELAY_MS = 500;    // first retry after about half a second ...
const MAX_DELAY_MS = 15000;    // ... doubling up to 15 s
const STABLE_MS = 10000;       // an open connection this old resets the backoff

export class Connection {
  /**
   * @param {object} hooks
   * @param {() => Promise<string>} hooks.url  the URL for the next attempt (may fetch config)
   * @param {(frame: object) => void} hooks.onFrame  one parsed server frame
   * @param {(state: string, seconds?: number) => void} hooks.onState
   * @param {(event: CloseEvent) => void} [hooks.onClose]
   */
  constructor(hooks) {
    this.hooks = hooks;
    this.ws = null;
    this.failures = 0;         // attempts since the last stable connection
    this.retryTimer = null;
    this.tickTimer = null;
    this.stableTimer = null;
    this.retryAt = 0;          // when the next attempt happens (ms since epoch)
    this.stopped = false;
    this.opening = false;
    window.addEventListener('online', () => this.retryNow());
    window.addEventListener('offline', () => { if (!this.isOpen()) this.setState('offline'); });
    window.addEventListener('pagehide', () => this.stop());
    window.addEventListener('pageshow', (event) => {
      if (event.persisted) { this.stopped = false; this.connect(); } // back from the bfcache
    });
  }

  isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Sends one frame (an object becomes JSON). Returns false when not connected. */
  send(frame) {
    if (!this.isOpen()) return false;
    this.ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame));
    return true;
  }

  /** Skips the rest of the waiting time (the "retry now" button, the browser going online). */
  retryNow() {
    if (this.stopped || this.ws || this.opening) return;
    this.connect();
  }

  /** Closes on purpose: no reconnecting afterwards. */
  stop() {
    this.stopped = true;
    this.clearTimers();
    if (this.ws) this.ws.close(1000);
  }

  async connect() {
    this.clearTimers();
    if (!navigator.onLine) { this.setState('offline'); return; }
    this.setState('connecting');
    let ws;
    this.opening = true; // while the URL is being worked out (it may fetch /config.json)
    try {
      ws = new WebSocket(await this.hooks.url());
    } catch (err) {
      console.warn('wschat: cannot connect:', err.message);
      this.scheduleRetry();
      return;
    } finally {
      this.opening = false;
    }
    this.ws = ws;
    ws.addEventListener('open', () => {
      this.setState('online');
      this.stableTimer = setTimeout(() => { this.failures = 0; }, STABLE_MS);
    });
    ws.addEventListener('message', (event) => this.receive(event.data));
    ws.addEventListener('close', (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearTimeout(this.stableTimer);
      if (this.hooks.onClose) this.hooks.onClose(event);
      if (!this.stopped) this.scheduleRetry();
    });
  }

  receive(data) {
    if (typeof data !== 'string') return;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      console.warn('wschat: ignoring a frame that is not JSON');
      return;
    }
    if (frame && typeof frame.type === 'string') this.hooks.onFrame(frame);
  }

  /** Waits min(15 s, 0.5 s * 2^failures), randomised to 50-100 % of that, then tries again. */
  scheduleRetry() {
    this.clearTimers();
    const ceiling = Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** this.failures);
    const delay = Math.round(ceiling * (0.5 + Math.random() * 0.5));
    this.failures += 1;
    this.retryAt = Date.now() + delay;
    this.retryTimer = setTimeout(() => this.connect(), delay);
    this.tick();
    this.tickTimer = setInterval(() => this.tick(), 1000);
  }

  tick() {
    const seconds = Math.max(0, Math.ceil((this.retryAt - Date.now()) / 1000));
    this.setState(navigator.onLine ? 'reconnecting' : 'offline', seconds);
  }

  clearTimers() {
    clearTimeout(this.retryTimer);
    clearInterval(this.tickTimer);
    this.retryTimer = this.tickTimer = null;
  }

  setState(state, seconds) {
    this.hooks.onState(state, seconds, this.retryAt);
  }
}
