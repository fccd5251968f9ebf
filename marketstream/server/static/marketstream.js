/**
 * marketstream.js: a browser client for marketstream (plain ES module, no build step,
 * no dependencies).  Serve it from the server (`/static/marketstream.js`) or copy it.
 *
 *     import {MarketStream} from "/static/marketstream.js";
 *
 *     const client = new MarketStream();                      // options below
 *     client.addEventListener("state", (e) => console.log(e.detail.state));
 *     client.addEventListener("message", (e) => {
 *       const {stream, data, seq} = e.detail;                  // seq: undefined on plain streams
 *       if (data.e === "trade") console.log(stream, data.p, data.q, data.m ? "sell" : "buy");
 *     });
 *     client.addEventListener("book", (e) => {
 *       const {stream, book} = e.detail;                       // book: an OrderBook
 *       console.log(stream, book.top("bids", 1), book.top("asks", 1));
 *     });
 *     client.addEventListener("gap", (e) => console.warn("missed updates on", e.detail.stream));
 *     client.addEventListener("refused", (e) => console.error(e.detail.stream, e.detail.reason));
 *     client.connect("ws://127.0.0.1:4000/ws");
 *     client.subscribe(["trade.BTC_USDT", "depth.BTC_USDT"]);   // depth: snapshot + diffs
 *     client.unsubscribe(["trade.BTC_USDT"]);
 *     client.close();
 *
 * What it does for you:
 *
 * - Reconnects after any disconnect with jittered exponential backoff
 *   (`minDelay` .. `maxDelay` ms) and subscribes again.  Streams that carry
 *   positions (`"seq"` on every frame) are resumed with `since` = the last
 *   position applied, so the server replays what was missed, each message once.
 *   Frames at or below the last position (duplicates) are dropped.
 * - Order books for `depth.*` streams: it asks for a snapshot
 *   (`{"e":"depthSnapshot","u":N,"b":[...],"a":[...]}`), then applies diffs
 *   (quantity "0" removes a level), checking continuity by `seq` (+1 per
 *   message) and by the diffs' update ids (`U` == previous `u` + 1).  On a gap
 *   notice (`data.e == "gap"`) or a broken continuity the stream is marked
 *   gapped and a new snapshot is requested (UNSUBSCRIBE + SUBSCRIBE with
 *   snapshot) unless one arrives by itself.
 * - Book checksums: a frame that carries `"checksum"` (the server's CRC-32 of
 *   the top 10 levels after it) is checked once applied; on a mismatch the
 *   stream gets a "gap" event (reason "checksum mismatch") and a new snapshot
 *   is asked for, that stream only, on the same connection.  Frames without
 *   one are not checked.  Top-N streams (`depth5|10|20.<MARKET>`, frames with
 *   `e = "depthTop"`) replace their book each frame; update speeds
 *   (`depth.<MARKET>@100ms`: merged diffs) skip positions, not update ids.
 * - Plain streams (no `seq`, no snapshots, e.g. an existing engine publishing
 *   with PUBLISH) work too: books are built from diffs alone by the `U`/`u`
 *   rules and marked "partial" (levels not changed since the client joined
 *   are missing).
 * - A stream with no message for `staleAfter` ms is marked "stale".
 * - It asks the server for acknowledgements on its connection (`"acks": true`):
 *   a stream the server refuses (a bad name, too many streams) is reported
 *   with the server's reason ("refused" event, `refused`) and forgotten.
 * - `close()` sends a close frame (1000), also while the connection is being
 *   made (it closes once open), and stops reconnecting.
 *
 * Options: `{url, minDelay: 250, maxDelay: 5000, staleAfter: 5000,
 * snapshotWait: 1500, snapshot: (stream) => stream.startsWith("depth."), token}`.
 * `token` (private streams): a JWT, or a function returning one (or a Promise of
 * one); it is asked on every (re)connect and sent as `?token=` (browsers cannot
 * set headers on a WebSocket), and a function's fresh token is sent with
 * `{"method":"AUTH"}` before each `exp` (half-way, at most 30 s before), so a
 * long-running page never sees the server's 4001 "token expired".
 * `subscribe(streams, {snapshot: true | false})` overrides the default choice.
 *
 * Events (all CustomEvent, data in `event.detail`):
 *   state      {state: "connecting"|"open"|"reconnecting"|"closed", reconnects, resumes,
 *               failures, and when reconnecting: delay (ms), attempt (1, 2, ... since the
 *               connection was lost), code and reason (the close event's), opened (whether
 *               the connection that ended had opened)}
 *              (also dispatched under the state's own name: "open", "reconnecting", ...)
 *   message    {stream, data, seq}              every frame applied (not duplicates)
 *   gap        {stream, reason, msg?, expected?, got?} missed updates: the server's notice
 *              (reason: its code, msg: its words) or a continuity the client found broken
 *   book       {stream, book}                   an order book changed
 *   status     {stream, status}                 "syncing"|"live"|"partial"|"gapped"|"stale"
 *   resume     {stream, since}                  a resumed stream continued without a gap
 *   refused    {stream, reason}                 the server refused the stream (not subscribed)
 *   servererror {code, msg}                     any other error the server answered
 *
 * Read-only state: `connected`, `state`, `reconnects` (connections re-established),
 * `failures` (connection attempts that never opened), `attempts` (reconnection attempts
 * since the connection was lost; 0 while open), `lastClose` ({code, reason} of the last
 * close), `refused` (stream -> the server's reason),
 * `resumes` (streams resumed without a gap), `lastSeq` (stream -> last position
 * applied), `books` (stream -> `{seq, u, status, bids: [[price, qty], ...],
 * asks: [...]}`, best first, strings as received), `streams` (stream -> its
 * statistics: status, count, rate, lastSeq, gaps, lastAt, checksums: {checked,
 * mismatches}).
 */

const SIDES = ["bids", "asks"];

function isZero(qty) {
  return Number(qty) === 0;
}

/**
 * An order book kept from a depth snapshot plus Binance-style diffs.
 *
 *     const book = new OrderBook();
 *     book.applySnapshot({e: "depthSnapshot", u: 41, b: [["100.1", "2"]], a: [["100.2", "1"]]}, 7);
 *     book.applyDiff({e: "depth", U: 42, u: 42, b: [["100.1", "0"]], a: []}, 8);  // "applied"
 *     book.top("bids", 10);   // [] ; book.top("asks", 1) -> [["100.2", "1"]]
 *
 * `applyDiff` returns "applied", "stale" (already included: ignored) or
 * "broken" (a diff is missing: the book must be rebuilt from a snapshot).
 * Without a snapshot the first diff starts a "partial" book.
 */
export class OrderBook {
  constructor() {
    this.clear();
  }

  /** Forget everything (status "empty"). */
  clear() {
    this.bids = new Map();   // price string -> quantity string
    this.asks = new Map();
    this.u = null;           // last update id applied
    this.seq = null;         // position of the last message applied (recoverable streams)
    this.status = "empty";   // "empty" | "synced" | "partial"
    this._fresh = false;     // true between a snapshot and the first diff applied after it
  }

  /** Replace the book with a snapshot `{u, b, a}` taken at position `seq`. */
  applySnapshot(data, seq) {
    this.bids = new Map();
    this.asks = new Map();
    for (const [price, qty] of data.b || []) if (!isZero(qty)) this.bids.set(price, qty);
    for (const [price, qty] of data.a || []) if (!isZero(qty)) this.asks.set(price, qty);
    this.u = data.u ?? null;
    this.seq = seq ?? null;
    this.status = "synced";
    this._fresh = true;
  }

  /** Apply one diff `{U, u, b, a}` (at position `seq`, if any). */
  applyDiff(data, seq) {
    const first = data.U, last = data.u;
    if (seq != null && this.seq != null && seq <= this.seq) return "stale";
    if (this.status === "empty") {
      this.status = "partial";
    } else {
      if (seq != null && this.seq != null && this.status === "synced" && seq !== this.seq + 1) return "broken";
      if (this.u !== null && last !== undefined && last <= this.u) {
        if (seq != null) this.seq = seq;   // a position with nothing new for the book
        return "stale";
      }
      // After a snapshot the first diff may straddle it (U <= u+1 <= u');
      // every later one must start right after the previous one.
      if (this.u !== null && first !== undefined && !(this._fresh ? first <= this.u + 1 : first === this.u + 1)) {
        return "broken";
      }
    }
    for (const [price, qty] of data.b || []) isZero(qty) ? this.bids.delete(price) : this.bids.set(price, qty);
    for (const [price, qty] of data.a || []) isZero(qty) ? this.asks.delete(price) : this.asks.set(price, qty);
    if (last !== undefined) this.u = last;
    this.seq = seq ?? null;
    this._fresh = false;
    return "applied";
  }

  /** The best `n` levels of "bids" or "asks" as [[price, qty], ...], best first. */
  top(side, n = Infinity) {
    const levels = [...this[side]];
    levels.sort(side === "bids" ? (x, y) => Number(y[0]) - Number(x[0]) : (x, y) => Number(x[0]) - Number(y[0]));
    return n < levels.length ? levels.slice(0, n) : levels;
  }

  /** `{seq, u, status, bids, asks}`, best first, strings as received. */
  toJSON() {
    return {seq: this.seq, u: this.u, status: this.status, bids: this.top("bids"), asks: this.top("asks")};
  }
}

// -- book checksums, top-N books and update speeds -------------------------------

/** Whether `stream` keeps an order book: depth streams, their top N and speeds. */
export function isBookStream(stream) {
  return /^depth(5|10|20)?$/.test(stream.split(".")[0]);
}

/** Whether `stream` is derived (`depth10.X`, `X@100ms`): its positions skip. */
export function isDerivedStream(stream) {
  return stream.includes("@") || /^depth(5|10|20)\./.test(stream);
}

let crcTable = null;

/** CRC-32 (IEEE, as zlib.crc32) of the UTF-8 bytes of `text`, unsigned. */
export function crc32(text) {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let crc = 0xffffffff;
  for (const byte of new TextEncoder().encode(text)) crc = crcTable[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/** The best `n` levels of a side (Map price -> qty), best first, without sorting it all. */
function bestLevels(side, n, descending) {
  const best = [];
  for (const [price, qty] of side) {
    const value = Number(price);
    if (best.length === n && (descending ? value <= best[n - 1][2] : value >= best[n - 1][2])) continue;
    let i = best.length;
    while (i > 0 && (descending ? best[i - 1][2] < value : best[i - 1][2] > value)) i -= 1;
    best.splice(i, 0, [price, qty, value]);
    if (best.length > n) best.pop();
  }
  return best;
}

/**
 * The checksum of an OrderBook, as the server computes it: CRC-32 of, for i in
 * 0..9, the i-th bid's price and quantity (if any) then the i-th ask's, joined
 * with ":", strings as received.
 */
export function bookChecksum(book) {
  const bids = bestLevels(book.bids, 10, true), asks = bestLevels(book.asks, 10, false);
  const parts = [];
  for (let i = 0; i < 10; i++) {
    if (i < bids.length) parts.push(bids[i][0], bids[i][1]);
    if (i < asks.length) parts.push(asks[i][0], asks[i][1]);
  }
  return crc32(parts.join(":"));
}

/** Apply a merged diff (an update speed): update ids follow, positions skip. */
function applyMergedDiff(book, data, seq) {
  const result = book.applyDiff(data, null);
  if (result === "applied" && seq !== null) book.seq = seq;
  return result;
}

class StreamState {
  constructor(name, snapshot) {
    this.name = name;
    this.isDepth = isBookStream(name);
    this.derived = isDerivedStream(name);   // positions skip: top-N frames, update speeds
    this.checksums = {checked: 0, mismatches: 0};
    this.snapshot = snapshot;      // ask for snapshots (on subscribe and after a gap)
    this.book = this.isDepth ? new OrderBook() : null;
    this.seq = null;               // last position applied
    this.status = "syncing";
    this.count = 0;                // messages applied
    this.gaps = 0;
    this.lastAt = 0;               // performance.now() of the last message
    this.awaitingSnapshot = false; // a snapshot was asked for and has not come yet
    this.snapshotTimer = null;
    this.resumeFrom = null;        // position sent as `since` on the last resubscribe
    this.plain = false;            // frames come without positions
    this.snapshotTries = 0;
    this.skipped = 0;              // diffs dropped while waiting for a snapshot
    this._times = [];              // arrival times within the rate window
  }

  /** Messages per second over the last five seconds. */
  rate(now) {
    while (this._times.length && now - this._times[0] > 5000) this._times.shift();
    return this._times.length / 5;
  }
}

/** The client.  See the header of this module for usage. */
export class MarketStream extends EventTarget {
  constructor(options = {}) {
    super();
    this.options = Object.assign({
      url: null, minDelay: 250, maxDelay: 5000, staleAfter: 5000, snapshotWait: 1500,
      snapshot: (stream) => stream.split(".")[0] === "depth",
    }, options);
    this.url = this.options.url;
    this.state = "closed";
    this.reconnects = 0;
    this.resumes = 0;
    this.failures = 0;           // attempts that never opened
    this.attempts = 0;           // reconnection attempts since the connection was lost
    this.lastClose = null;       // {code, reason} of the last close event
    this.refused = {};           // stream -> the server's reason
    this._streams = new Map();   // name -> StreamState
    this._ws = null;
    this._attempt = 0;
    this._timer = null;
    this._openedAt = 0;
    this._everOpened = false;
    this._nextId = 1;
    this._wanted = false;        // connect() called and close() not
    this._staleTimer = setInterval(() => this._checkStale(), 500);
  }

  get connected() {
    return this.state === "open";
  }

  /** stream -> last position applied (recoverable streams only). */
  get lastSeq() {
    const out = {};
    for (const [name, s] of this._streams) if (s.seq !== null) out[name] = s.seq;
    return out;
  }

  /** stream -> `{seq, u, status, bids, asks}` for every depth stream with a book. */
  get books() {
    const out = {};
    for (const [name, s] of this._streams) {
      if (s.book && s.book.status !== "empty") out[name] = s.book.toJSON();
    }
    return out;
  }

  /** stream -> `{status, count, rate, lastSeq, gaps, lastAt}`. */
  get streams() {
    const now = performance.now(), out = {};
    for (const [name, s] of this._streams) {
      out[name] = {status: s.status, count: s.count, rate: s.rate(now), lastSeq: s.seq,
                   gaps: s.gaps, lastAt: s.lastAt, checksums: {...s.checksums}};
    }
    return out;
  }

  /** The OrderBook of a depth stream (or undefined). */
  book(stream) {
    return this._streams.get(stream)?.book ?? undefined;
  }

  /** Open the connection (and keep it open until close()). */
  connect(url) {
    if (url) this.url = url;
    if (!this.url) throw new Error("MarketStream.connect: no URL");
    this._wanted = true;
    if (!this._ws) this._open();
    return this;
  }

  /**
   * Close for good with a close frame (1000): no reconnect.  Subscriptions are
   * kept for a later connect().
   */
  close() {
    this._wanted = false;
    this._stopRefresh();
    clearTimeout(this._timer);
    this._timer = null;
    if (this._ws) {
      const ws = this._ws;
      this._ws = null;
      ws.onmessage = ws.onclose = ws.onerror = null;
      if (ws.readyState === WebSocket.CONNECTING) {
        // Closing now would abandon the handshake without a close frame.
        ws.onopen = () => ws.close(1000);
      } else {
        ws.onopen = null;
        ws.close(1000);
      }
    }
    this._setState("closed");
  }

  /**
   * Subscribe to `streams` (array or one name).  `snapshot`: ask for the
   * streams' snapshots (default: the `snapshot` option, depth streams).
   */
  subscribe(streams, {snapshot} = {}) {
    const names = [].concat(streams).filter((name) => !this._streams.has(name));
    if (!names.length) return;
    for (const name of names) {
      const state = new StreamState(name, snapshot ?? this.options.snapshot(name));
      state.awaitingSnapshot = Boolean(state.book && state.snapshot);
      this._streams.set(name, state);
    }
    if (this.connected) {
      const withSnapshot = names.filter((name) => this._streams.get(name).snapshot);
      this._send({method: "SUBSCRIBE", params: names, id: this._nextId++, acks: true,
                  ...(withSnapshot.length ? {snapshot: withSnapshot} : {})});
      for (const name of names) {
        const s = this._streams.get(name);
        if (s.awaitingSnapshot) this._armSnapshotTimer(s);
      }
    }
  }

  /** Unsubscribe from `streams` (array or one name) and forget their state. */
  unsubscribe(streams) {
    const names = [].concat(streams).filter((name) => this._streams.has(name));
    if (!names.length) return;
    for (const name of names) {
      clearTimeout(this._streams.get(name).snapshotTimer);
      this._streams.delete(name);
    }
    if (this.connected) this._send({method: "UNSUBSCRIBE", params: names, id: this._nextId++});
  }

  // -- connection ---------------------------------------------------------

  _setState(state, extra = {}) {
    if (this.state === state && !extra.delay) return;
    this.state = state;
    const detail = {state, reconnects: this.reconnects, resumes: this.resumes,
                    failures: this.failures, ...extra};
    this.dispatchEvent(new CustomEvent("state", {detail}));
    this.dispatchEvent(new CustomEvent(state, {detail}));
  }

  _open() {
    if (this._awaitToken()) return;   // token option: _open again once a token is there
    this._setState(this._everOpened ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new WebSocket(this._tokenUrl());
    } catch (error) {
      this.failures += 1;
      this._scheduleReconnect({reason: String(error), opened: false});
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._onOpen();
    ws.onmessage = (event) => this._onMessage(event.data);
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._stopRefresh();
      const opened = this._openedAt !== 0;
      if (!opened) this.failures += 1;
      if (opened && performance.now() - this._openedAt > 5000) this._attempt = 0;
      this._openedAt = 0;
      this.lastClose = {code: event.code, reason: event.reason};
      if (this._wanted) this._scheduleReconnect({code: event.code, reason: event.reason, opened});
      else this._setState("closed");
    };
    ws.onerror = () => {};   // a close event follows
  }

  _scheduleReconnect(why = {}) {
    // Exponential backoff with jitter: a random delay in [d/2, d], d doubling per attempt.
    const ceiling = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** this._attempt);
    const delay = Math.round(ceiling / 2 + Math.random() * ceiling / 2);
    this._attempt += 1;
    this.attempts += 1;
    this._setState("reconnecting", {delay, attempt: this.attempts, ...why});
    clearTimeout(this._timer);
    this._timer = setTimeout(() => {
      this._timer = null;
      if (this._wanted && !this._ws) this._open();
    }, delay);
  }

  _onOpen() {
    if (this._everOpened) this.reconnects += 1;
    this._everOpened = true;
    this.attempts = 0;
    this._openedAt = performance.now();
    this._armRefresh(this._usedToken);
    if (this._streams.size) {
      const params = [], since = {}, snapshot = [];
      for (const [name, s] of this._streams) {
        params.push(name);
        s.resumeFrom = null;
        const rebuild = s.book && s.book.status !== "synced" && s.snapshot && !s.plain;
        if (s.seq !== null && !rebuild) {
          since[name] = s.seq;           // resume: the server replays what was missed
          s.resumeFrom = s.seq;
        } else if (s.snapshot && !s.plain) {
          snapshot.push(name);
          if (s.book) {
            s.book.clear();
            s.seq = null;
            s.awaitingSnapshot = true;
            this._armSnapshotTimer(s);
          }
        }
      }
      // Acknowledgements on this connection: refused streams are reported.
      const request = {method: "SUBSCRIBE", params, id: this._nextId++, acks: true};
      if (Object.keys(since).length) request.since = since;
      if (snapshot.length) request.snapshot = snapshot;
      this._send(request);
    }
    this._setState("open");
  }

  // -- tokens (private streams) -------------------------------------------------

  /** With the `token` option and no token fetched for this attempt: fetch one
   * (the function may return a Promise), then _open() again; true meanwhile. */
  _awaitToken() {
    const source = this.options.token;
    if (source === undefined || source === null || this._freshToken !== undefined) return false;
    if (this._fetchingToken) return true;
    this._fetchingToken = true;
    this._setState(this._everOpened ? "reconnecting" : "connecting");
    Promise.resolve().then(() => (typeof source === "function" ? source() : source)).then(
      (token) => {
        this._fetchingToken = false;
        this._freshToken = String(token);
        if (this._wanted && !this._ws) this._open();
      },
      (error) => {
        this._fetchingToken = false;
        this.failures += 1;
        if (this._wanted) this._scheduleReconnect({reason: "token: " + error, opened: false});
      });
    return true;
  }

  /** The URL of this attempt: `url` with `?token=` when there is a token (used once). */
  _tokenUrl() {
    const token = this._freshToken;
    this._freshToken = undefined;       // the next attempt asks for a fresh one
    this._usedToken = token;
    if (token === undefined) return this.url;
    const url = new URL(this.url);
    url.searchParams.set("token", token);
    return url.toString();
  }

  /** The `exp` of a JWT in seconds (not verified: the server does), or null. */
  static tokenExpiry(token) {
    try {
      const part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const exp = JSON.parse(atob(part + "===".slice((part.length + 3) % 4))).exp;
      return typeof exp === "number" ? exp : null;
    } catch (error) {
      return null;
    }
  }

  /** Send AUTH with a fresh token from the `token` function before `token` expires. */
  _armRefresh(token) {
    this._stopRefresh();
    if (typeof this.options.token !== "function" || token === undefined) return;
    const exp = MarketStream.tokenExpiry(token);
    if (exp === null) return;
    const left = Math.max(0, exp - Date.now() / 1000);
    const delay = (left - Math.min(30, left / 2)) * 1000;
    this._refreshTimer = setTimeout(async () => {
      this._refreshTimer = null;
      let fresh;
      try {
        fresh = String(await this.options.token());
      } catch (error) {
        fresh = token;
      }
      if (!this.connected) return;
      if (fresh === token) {            // nothing newer yet: ask again in a second
        if (exp > Date.now() / 1000) this._refreshTimer = setTimeout(() => this._armRefresh(token), 1000);
        return;
      }
      this.tokenRefreshes = (this.tokenRefreshes || 0) + 1;
      this._send({method: "AUTH", params: [fresh], id: this._nextId++});
      this._armRefresh(fresh);
    }, delay);
  }

  _stopRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
  }

  _send(message) {
    if (this._ws && this._ws.readyState === WebSocket.OPEN) this._ws.send(JSON.stringify(message));
  }

  // -- messages -------------------------------------------------------------

  _onMessage(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch (error) {
      return;
    }
    if (message && typeof message.stream !== "string" && message.error) {
      this._onError(message.error);
      return;
    }
    if (!message || typeof message.stream !== "string" || typeof message.data !== "object" || !message.data) return;
    const s = this._streams.get(message.stream);
    if (!s) return;   // unsubscribed meanwhile
    const {data} = message;
    const seq = typeof message.seq === "number" ? message.seq : null;

    if (data.e === "gap") {
      this._gap(s, {reason: data.reason || "gap notice", msg: data.msg, notice: true});
      return;
    }
    if (data.e === "unsubscribed" && seq === null) {
      // The server ended the stream (derived from a book stream it keeps no
      // book for): a refusal, as in a reply.
      this._onError({refused: {[message.stream]: data.msg || data.reason || "unsubscribed"}});
      return;
    }
    s.plain = seq === null;
    if (seq !== null && s.seq !== null && seq <= s.seq) return;   // already applied
    const jumped = seq !== null && s.seq !== null && seq !== s.seq + 1 && !s.derived;
    const resumed = s.resumeFrom;
    s.resumeFrom = null;
    const reason = resumed !== null ? "resume incomplete" : "position jumped";

    if (s.book) {
      if (!this._applyBook(s, data, seq, jumped, reason)) return;
      if (!this._checkBook(s, message.checksum)) return;
    } else if (jumped) {
      this._gap(s, {reason, expected: s.seq + 1, got: seq});
    }
    if (resumed !== null && seq !== null && !jumped) {
      this.resumes += 1;
      this.dispatchEvent(new CustomEvent("resume", {detail: {stream: s.name, since: resumed}}));
    }

    if (seq !== null) s.seq = seq;
    s.count += 1;
    s.lastAt = performance.now();
    s._times.push(s.lastAt);
    this._setStatus(s, s.book ? (s.book.status === "synced" ? "live" : "partial") : "live");
    this.dispatchEvent(new CustomEvent("message", {detail: {stream: s.name, data, seq: seq ?? undefined}}));
    if (s.book) this.dispatchEvent(new CustomEvent("book", {detail: {stream: s.name, book: s.book}}));
  }

  /** An error reply: refused streams are forgotten and reported, others reported. */
  _onError(error) {
    const refused = error.refused && typeof error.refused === "object" ? error.refused : null;
    if (!refused) {
      this.dispatchEvent(new CustomEvent("servererror", {detail: {code: error.code, msg: error.msg}}));
      return;
    }
    for (const [stream, reason] of Object.entries(refused)) {
      this.refused[stream] = reason;
      const s = this._streams.get(stream);
      if (s) {
        clearTimeout(s.snapshotTimer);
        this._streams.delete(stream);
      }
      this.dispatchEvent(new CustomEvent("refused", {detail: {stream, reason}}));
    }
  }

  /** Apply a depth frame to the stream's book; false if it was not applied. */
  _applyBook(s, data, seq, jumped, reason) {
    const book = s.book;
    if (data.e === "depthSnapshot" || data.e === "depthTop") {
      book.applySnapshot(data, seq);
      s.awaitingSnapshot = false;
      s.snapshotTries = 0;
      clearTimeout(s.snapshotTimer);
      return true;
    }
    if (s.awaitingSnapshot) {
      if (seq !== null) {
        s.skipped += 1;   // the snapshot asked for includes it
        return false;
      }
      // No positions: a plain stream, which has no snapshots.  Build from diffs.
      s.awaitingSnapshot = false;
      clearTimeout(s.snapshotTimer);
    }
    if (jumped && book.status === "synced") {
      this._gap(s, {reason, expected: s.seq + 1, got: seq});
      return false;
    }
    const result = s.derived ? applyMergedDiff(book, data, seq) : book.applyDiff(data, seq);
    if (result === "stale") return seq !== null && seq > (s.seq ?? -1);   // a position without news
    if (result === "broken") {
      this._gap(s, {reason: "update ids not continuous", expected: book.u + 1, got: data.U});
      if (s.awaitingSnapshot) return false;   // a snapshot will rebuild it
      // Nothing to rebuild from: go on, marked partial.
      book.u = null;
      book.status = "partial";
      book.applyDiff(data, seq);
    }
    return true;
  }

  /**
   * Check the book of `s` against the frame's `checksum` (if it has one and
   * the book is synced); on a mismatch, a gap: a new snapshot is asked for.
   * False if the book is not the server's.
   */
  _checkBook(s, checksum) {
    if (typeof checksum !== "number" || s.book.status !== "synced") return true;
    s.checksums.checked += 1;
    const mine = bookChecksum(s.book);
    if (mine === checksum) return true;
    s.checksums.mismatches += 1;
    this._gap(s, {reason: "checksum mismatch", expected: checksum, got: mine});
    return false;
  }

  _setStatus(s, status) {
    if (s.status === status) return;
    s.status = status;
    this.dispatchEvent(new CustomEvent("status", {detail: {stream: s.name, status}}));
  }

  _gap(s, {notice, ...detail}) {
    s.gaps += 1;
    s.resumeFrom = null;
    // After a gap notice positions may start over (history lost): the next
    // one is the new base, whatever its value.
    if (notice) s.seq = null;
    this._setStatus(s, "gapped");
    this.dispatchEvent(new CustomEvent("gap", {detail: {stream: s.name, ...detail}}));
    if (!s.book) return;
    if (s.book.status === "synced") s.book.status = "gapped";
    if (s.snapshot && !s.plain && !s.awaitingSnapshot) {
      // The book missed diffs.  A server that resumes sends a snapshot right after
      // its gap notice: wait a moment for it; on broken continuity ask at once.
      s.awaitingSnapshot = true;
      s.seq = null;
      this._armSnapshotTimer(s, notice ? 500 : 0);
    }
  }

  _armSnapshotTimer(s, delay = this.options.snapshotWait) {
    clearTimeout(s.snapshotTimer);
    s.snapshotTimer = setTimeout(() => this._snapshotTimeout(s), delay);
  }

  _snapshotTimeout(s) {
    if (this._streams.get(s.name) !== s || !s.awaitingSnapshot || !this.connected) return;
    s.snapshotTries += 1;
    if (s.snapshotTries > 3 && s.skipped > 0) {
      // Diffs arrive but snapshots never do: build the book from diffs alone.
      s.awaitingSnapshot = false;
      s.book.clear();
      return;
    }
    // Ask again: UNSUBSCRIBE + SUBSCRIBE with snapshot.
    s.book.clear();
    s.seq = null;
    s.skipped = 0;
    this._send({method: "UNSUBSCRIBE", params: [s.name], id: this._nextId++});
    this._send({method: "SUBSCRIBE", params: [s.name], id: this._nextId++, acks: true,
                snapshot: [s.name]});
    this._setStatus(s, "syncing");
    this._armSnapshotTimer(s);
  }

  _checkStale() {
    const now = performance.now();
    for (const s of this._streams.values()) {
      const since = s.lastAt || this._openedAt;
      if (since && now - since > this.options.staleAfter && s.status !== "gapped") this._setStatus(s, "stale");
    }
  }
}

export default MarketStream;
