// segue.js: a small Phoenix Channels V2 client for Segue's socket (an ES module, no
// dependencies). It follows the protocol in docs/protocol.md: frames are
// [join_ref, ref, topic, event, payload]; heartbeats on "phoenix"; replies matched by ref;
// channels rejoin after a reconnect; frames of an older join are ignored. The official
// `phoenix` npm client is what the server's tests use; this module is the page's own.

const HEARTBEAT_MS = 30000;
const PUSH_TIMEOUT_MS = 10000;
const RECONNECT_MS = [10, 50, 100, 150, 200, 250, 500, 1000, 2000, 5000];
const REJOIN_MS = [1000, 2000, 5000, 10000];

const after = (steps, tries) => steps[Math.min(tries, steps.length - 1)];

// The access token rides in Sec-WebSocket-Protocol, as the phoenix client's authToken does,
// so it stays out of URLs and logs. Base64url, unpadded: a subprotocol is a token.
function authProtocol(token) {
  const base64 = btoa(token).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return `base64url.bearer.phx.${base64}`;
}

export class Socket {
  // `endpoint`: e.g. "/socket" (same origin) or "wss://hub.example/socket".
  // `options.token()` and `options.params()` are read at every (re)connect;
  // `options.heartbeatMs` and `options.reconnectMs` (a list of waits) tune the timings.
  constructor(endpoint, options = {}) {
    this.endpoint = endpoint;
    this.heartbeatMs = options.heartbeatMs || HEARTBEAT_MS;
    this.reconnectMs = options.reconnectMs || RECONNECT_MS;
    this.token = options.token || (() => null);
    this.params = options.params || (() => ({}));
    this.channels = [];
    this.pending = new Map(); // ref -> Push awaiting its reply
    this.ref = 0;
    this.tries = 0;
    this.heartbeatRef = null;
    this.listeners = { open: [], close: [] };
    this.closedByUs = false;
    this.ws = null;
  }

  onOpen(callback) { this.listeners.open.push(callback); }
  onClose(callback) { this.listeners.close.push(callback); }

  isConnected() { return this.ws !== null && this.ws.readyState === WebSocket.OPEN; }

  makeRef() { this.ref += 1; return String(this.ref); }

  url() {
    const base = new URL(this.endpoint, window.location.href);
    base.protocol = base.protocol === "https:" ? "wss:" : base.protocol === "http:" ? "ws:" : base.protocol;
    base.pathname = `${base.pathname.replace(/\/$/, "")}/websocket`;
    const query = new URLSearchParams({ ...this.params(), vsn: "2.0.0" });
    base.search = query.toString();
    return base.toString();
  }

  connect() {
    this.closedByUs = false;
    const token = this.token();
    const protocols = token ? ["phoenix", authProtocol(token)] : ["phoenix"];
    const ws = new WebSocket(this.url(), protocols);
    this.ws = ws;
    ws.onopen = () => {
      this.tries = 0;
      this.startHeartbeat();
      this.listeners.open.forEach((cb) => cb());
      this.channels.forEach((channel) => channel.socketOpened());
    };
    ws.onmessage = (event) => this.receive(event.data);
    ws.onclose = (event) => this.lost(ws, event);
  }

  // The connection `ws` ended (or is given up): fail what waits, mark channels for rejoin,
  // and reconnect unless we closed it on purpose. A late close of an abandoned socket is
  // ignored.
  lost(ws, event) {
    if (this.ws !== ws) return;
    this.ws = null;
    clearInterval(this.heartbeatTimer);
    this.failPending();
    this.channels.forEach((channel) => channel.socketClosed());
    this.listeners.close.forEach((cb) => cb(event));
    if (!this.closedByUs) {
      const wait = after(this.reconnectMs, this.tries);
      this.tries += 1;
      this.reconnectTimer = setTimeout(() => this.connect(), wait);
    }
  }

  disconnect() {
    this.closedByUs = true;
    clearTimeout(this.reconnectTimer);
    clearInterval(this.heartbeatTimer);
    if (this.ws) this.ws.close(1000);
  }

  startHeartbeat() {
    clearInterval(this.heartbeatTimer);
    this.heartbeatRef = null;
    this.heartbeatTimer = setInterval(() => {
      if (this.heartbeatRef !== null) {
        // The last heartbeat went unanswered: the connection is dead. Reconnect now rather
        // than wait for a closing handshake that a dead connection never finishes.
        this.heartbeatRef = null;
        const dead = this.ws;
        if (dead) {
          this.lost(dead, { code: 4000, reason: "heartbeat timeout" });
          try { dead.close(4000, "heartbeat timeout"); } catch { /* already closing */ }
        }
        return;
      }
      this.heartbeatRef = this.makeRef();
      this.send([null, this.heartbeatRef, "phoenix", "heartbeat", {}]);
    }, this.heartbeatMs);
  }

  send(frame) {
    if (!this.isConnected()) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  failPending() {
    const pending = [...this.pending.values()];
    this.pending.clear();
    pending.forEach((push) => push.settle("error", { reason: "disconnected" }));
  }

  receive(data) {
    let frame;
    try { frame = JSON.parse(data); } catch { return; }
    if (!Array.isArray(frame) || frame.length !== 5) return;
    const [joinRef, ref, topic, event, payload] = frame;
    if (topic === "phoenix" && ref === this.heartbeatRef) {
      this.heartbeatRef = null;
      return;
    }
    if (event === "phx_reply" && ref !== null) {
      const push = this.pending.get(ref);
      if (push) {
        this.pending.delete(ref);
        push.settle(payload.status, payload.response);
      }
      return;
    }
    this.channels
      .filter((channel) => channel.topic === topic)
      .forEach((channel) => channel.deliver(joinRef, event, payload));
  }

  channel(topic, params = {}) {
    const channel = new Channel(this, topic, params);
    this.channels.push(channel);
    return channel;
  }

  remove(channel) {
    this.channels = this.channels.filter((c) => c !== channel);
  }
}

class Push {
  constructor(socket, frame, timeout) {
    this.socket = socket;
    this.frame = frame;
    this.handlers = [];
    this.settled = null;
    this.timeout = timeout;
  }

  receive(status, callback) {
    if (this.settled && this.settled.status === status) callback(this.settled.response);
    else this.handlers.push({ status, callback });
    return this;
  }

  send() {
    const ref = this.frame[1];
    this.socket.pending.set(ref, this);
    if (!this.socket.send(this.frame)) {
      this.socket.pending.delete(ref);
      this.settle("error", { reason: "disconnected" });
      return this;
    }
    this.timer = setTimeout(() => {
      if (this.socket.pending.delete(ref)) this.settle("timeout", {});
    }, this.timeout);
    return this;
  }

  settle(status, response) {
    if (this.settled) return;
    clearTimeout(this.timer);
    this.settled = { status, response };
    this.handlers.filter((h) => h.status === status).forEach((h) => h.callback(response));
  }
}

// A promise for a push's reply: resolves with "ok" responses, rejects with the others.
export function reply(push) {
  return new Promise((resolve, reject) => {
    push.receive("ok", resolve)
      .receive("error", (r) => reject(new Error(r && r.reason ? r.reason : "error")))
      .receive("timeout", () => reject(new Error("timeout")));
  });
}

class Channel {
  constructor(socket, topic, params) {
    this.socket = socket;
    this.topic = topic;
    this.params = params;
    this.state = "closed";
    this.joinRef = null;
    this.bindings = [];
    this.tries = 0;
    this.joinCallbacks = [];
  }

  on(event, callback) { this.bindings.push({ event, callback }); }

  // Joins now (or once the socket is open) and after every reconnect; `onJoined(response)`
  // runs after each successful join, `onError(reason)` after each refusal.
  join(onJoined = () => {}, onError = () => {}) {
    this.joinCallbacks = [onJoined, onError];
    this.state = "joining";
    if (this.socket.isConnected()) this.sendJoin();
    return this;
  }

  sendJoin() {
    clearTimeout(this.rejoinTimer);
    this.state = "joining";
    const ref = this.socket.makeRef();
    this.joinRef = ref;
    const params = typeof this.params === "function" ? this.params() : this.params;
    new Push(this.socket, [ref, ref, this.topic, "phx_join", params], PUSH_TIMEOUT_MS)
      .receive("ok", (response) => {
        if (this.joinRef !== ref) return;
        this.state = "joined";
        this.tries = 0;
        this.joinCallbacks[0](response);
      })
      .receive("error", (response) => {
        if (this.joinRef !== ref) return;
        this.state = "errored";
        this.joinCallbacks[1](response && response.reason);
        this.scheduleRejoin();
      })
      .receive("timeout", () => {
        if (this.joinRef !== ref) return;
        this.state = "errored";
        this.scheduleRejoin();
      })
      .send();
  }

  scheduleRejoin() {
    clearTimeout(this.rejoinTimer);
    const wait = after(REJOIN_MS, this.tries);
    this.tries += 1;
    this.rejoinTimer = setTimeout(() => {
      if (this.state === "errored" && this.socket.isConnected()) this.sendJoin();
    }, wait);
  }

  socketOpened() {
    if (this.state === "joining" || this.state === "joined" || this.state === "errored") this.sendJoin();
  }

  socketClosed() {
    clearTimeout(this.rejoinTimer);
    if (this.state === "joined" || this.state === "joining") this.state = "errored";
  }

  deliver(joinRef, event, payload) {
    // A frame of an earlier join belongs to a channel that no longer exists.
    if (joinRef !== null && joinRef !== this.joinRef) return;
    if (event === "phx_close") { this.state = "closed"; return; }
    if (event === "phx_error") { this.state = "errored"; this.scheduleRejoin(); return; }
    this.bindings.filter((b) => b.event === event).forEach((b) => b.callback(payload));
  }

  push(event, payload = {}) {
    if (this.state !== "joined") {
      const push = new Push(this.socket, null, 0);
      push.settle("error", { reason: "not joined" });
      return push;
    }
    const frame = [this.joinRef, this.socket.makeRef(), this.topic, event, payload];
    return new Push(this.socket, frame, PUSH_TIMEOUT_MS).send();
  }

  leave() {
    clearTimeout(this.rejoinTimer);
    if (this.state === "joined") {
      this.socket.send([this.joinRef, this.socket.makeRef(), this.topic, "phx_leave", {}]);
    }
    this.state = "closed";
    this.socket.remove(this);
  }
}

// Presence lists merged from presence_state and presence_diff, as Phoenix's Presence does:
// metas are matched by phx_ref; a key whose metas are all gone is dropped. Diffs that arrive
// before the state of the current join wait for it.
export class Presence {
  constructor(channel) {
    this.state = {};
    this.synced = false;
    this.pendingDiffs = [];
    this.syncCallbacks = [];
    channel.on("presence_state", (state) => {
      this.state = Presence.syncState(state);
      this.pendingDiffs.forEach((diff) => Presence.syncDiff(this.state, diff));
      this.pendingDiffs = [];
      this.synced = true;
      this.changed();
    });
    channel.on("presence_diff", (diff) => {
      if (!this.synced) { this.pendingDiffs.push(diff); return; }
      Presence.syncDiff(this.state, diff);
      this.changed();
    });
  }

  // Call on every (re)join: the join brings a fresh presence_state, and diffs wait for it.
  resync() { this.synced = false; this.pendingDiffs = []; }

  onSync(callback) { this.syncCallbacks.push(callback); }

  changed() { this.syncCallbacks.forEach((cb) => cb()); }

  // [[key, metas], ...]
  list() { return Object.entries(this.state).map(([key, value]) => [key, value.metas]); }

  static syncState(incoming) {
    const state = {};
    for (const [key, value] of Object.entries(incoming)) state[key] = { metas: [...value.metas] };
    return state;
  }

  static syncDiff(state, { joins = {}, leaves = {} }) {
    for (const [key, joined] of Object.entries(joins)) {
      const current = state[key];
      if (current) {
        const refs = new Set(current.metas.map((m) => m.phx_ref));
        current.metas = [...joined.metas.filter((m) => !refs.has(m.phx_ref)), ...current.metas];
      } else {
        state[key] = { metas: [...joined.metas] };
      }
    }
    for (const [key, left] of Object.entries(leaves)) {
      const current = state[key];
      if (!current) continue;
      const refs = new Set(left.metas.map((m) => m.phx_ref));
      current.metas = current.metas.filter((m) => !refs.has(m.phx_ref));
      if (current.metas.length === 0) delete state[key];
    }
    return state;
  }
}
