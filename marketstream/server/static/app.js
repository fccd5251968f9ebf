// The live market page: order book ladder, trade tape, tickers, connection and stream state.
// Query parameters: ?market=ETH_USDT (selected market), ?markets=A_B,C_D (the selector),
// ?ws=ws://host:port/ws (another server; default: this page's host, path /ws).
// The client is window.marketstream (see marketstream.js): connected, lastSeq, books;
// window.ladder says which stream the order book ladder shows and why (ladderState()).
import {MarketStream} from "./marketstream.js";

const DEMO_MARKETS = ["BTC_USDT", "ETH_USDT", "SOL_USDT", "SOL_USDC"];
const LEVELS = 15;        // ladder rows per side
const TAPE_ROWS = 40;
const LOG_ROWS = 40;
// The ladder's update speed: merged diffs every 250 ms.  Four redraws a second is about as
// fast as an eye can read changing sizes (every diff, 20+ a second on a busy market, only
// makes the rows flicker; 100 ms is the render loop's own pace; 1000 ms lags visibly behind
// the trade tape), and it cuts the ladder's frames to at most 4 a second per market.
const LADDER_SPEED = "@250ms";

const query = new URLSearchParams(location.search);
const markets = (query.get("markets") || "").split(",").map((m) => m.trim()).filter(Boolean);
if (!markets.length) markets.push(...DEMO_MARKETS);
let market = markets.includes(query.get("market")) ? query.get("market") : markets[0];
const wsUrl = query.get("ws") || `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;

const client = new MarketStream({staleAfter: 3000});
window.marketstream = client;

const $ = (id) => document.getElementById(id);
const tickers = new Map();   // market -> last ticker data
let trades = [];             // newest first, selected market
const plainLadder = new Map(); // market -> why the server refused its speed stream
const mismatchAt = new Map();  // stream -> Date.now() of its last checksum mismatch
const dirty = {book: true, tape: true, ticker: true, markets: true};

// -- helpers ----------------------------------------------------------------

function decimals(text) {
  const dot = text.indexOf(".");
  return dot < 0 ? 0 : text.length - dot - 1;
}

function clock(ms) {
  const d = new Date(ms);
  return d.toTimeString().slice(0, 8) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function change(data) {
  const open = Number(data.o), last = Number(data.c);
  const diff = last - open;
  const pct = open ? (diff / open) * 100 : 0;
  const sign = diff > 0 ? "+" : diff < 0 ? "−" : "";
  return {text: `${sign}${Math.abs(diff).toFixed(decimals(data.c))} (${sign}${Math.abs(pct).toFixed(2)}%)`,
          cls: diff > 0 ? "up" : diff < 0 ? "down" : ""};
}

function log(text, cls = "") {
  const list = $("log");
  const item = el("li", cls);
  item.append(el("time", "", clock(Date.now()).slice(0, 8)), " " + text);
  list.prepend(item);
  while (list.children.length > LOG_ROWS) list.lastChild.remove();
}

// -- subscriptions ------------------------------------------------------------

// The ladder shows depth.<m>@250ms (a snapshot of the server's book, then merged diffs); a
// server that refuses it (one without server books, or a stream published without snapshots)
// gets plain depth.<m>, every diff, as before.  Plain depth.<m> is asked for in the same
// request, as a standby dropped once the speed stream has sent its first frame: asked for
// after the refusal, its snapshot would share the connection's catch-up budget with the
// tickers' snapshots still being read, get none of it, and come only after a gap notice
// ("snapshot_too_large") and a second try.
function ladderStream(m) {
  return plainLadder.has(m) ? `depth.${m}` : `depth.${m}${LADDER_SPEED}`;
}

/** The market of `depth.<m>@250ms`, or null for any other stream. */
function speedMarket(stream) {
  return stream.startsWith("depth.") && stream.endsWith(LADDER_SPEED)
    ? stream.slice("depth.".length, -LADDER_SPEED.length) : null;
}

function ladderState() {
  const stream = ladderStream(market);
  return {stream, speed: plainLadder.has(market) ? null : LADDER_SPEED.slice(1),
          refused: plainLadder.get(market) ?? null};
}

function marketStreams(m) {
  return plainLadder.has(m) ? [`trade.${m}`, `depth.${m}`]
    : [`trade.${m}`, `depth.${m}${LADDER_SPEED}`, `depth.${m}`];
}

function select(next) {
  if (next === market && client.book(ladderStream(market))) return;
  client.unsubscribe([`trade.${market}`, `depth.${market}${LADDER_SPEED}`, `depth.${market}`]);
  market = next;
  trades = [];
  client.subscribe(marketStreams(market));
  const url = new URL(location.href);
  url.searchParams.set("market", market);
  history.replaceState(null, "", url);
  Object.assign(dirty, {book: true, tape: true, ticker: true, markets: true});
}

// -- rendering ------------------------------------------------------------------

function renderMarkets() {
  const nav = $("markets");
  if (nav.children.length !== markets.length) {
    nav.replaceChildren(...markets.map((m) => {
      const button = el("button", "market");
      button.dataset.market = m;
      button.append(el("span", "name", m.replace("_", "/")), el("span", "price", "—"), el("span", "pct", ""));
      button.addEventListener("click", () => select(m));
      return button;
    }));
  }
  for (const button of nav.children) {
    const data = tickers.get(button.dataset.market);
    button.classList.toggle("selected", button.dataset.market === market);
    if (!data) continue;
    const ch = change(data);
    button.querySelector(".price").textContent = data.c;
    const pct = button.querySelector(".pct");
    pct.textContent = ch.text.replace(/^.*\(/, "").replace(")", "");
    pct.className = "pct " + ch.cls;
  }
}

function renderTicker() {
  const data = tickers.get(market);
  $("ticker-market").textContent = market.replace("_", "/");
  if (!data) {
    for (const id of ["last", "change", "high", "low", "volume", "quote-volume", "trade-count"]) $(id).textContent = "—";
    return;
  }
  const [base, quote] = market.split("_");
  const ch = change(data);
  $("last").textContent = data.c;
  $("last").className = ch.cls;
  $("change").textContent = ch.text;
  $("change").className = "change " + ch.cls;
  $("high").textContent = data.h;
  $("low").textContent = data.l;
  $("volume").textContent = `${data.v} ${base}`;
  $("quote-volume").textContent = `${data.V} ${quote}`;
  $("trade-count").textContent = String(data.n);
}

function ladderRows(levels, side, maxTotal, qtyDecimals) {
  let total = 0;
  const rows = levels.map(([price, qty]) => {
    total += Number(qty);
    const row = el("div", `row ${side}`);
    const bar = el("span", "bar");
    bar.style.width = `${maxTotal ? (total / maxTotal) * 100 : 0}%`;
    row.append(bar, el("span", "price", price), el("span", "qty", qty), el("span", "total", total.toFixed(qtyDecimals)));
    return row;
  });
  return rows;
}

function renderBook() {
  const book = client.book(ladderStream(market));
  const bids = book ? book.top("bids", LEVELS) : [];
  const asks = book ? book.top("asks", LEVELS) : [];
  const sum = (levels) => levels.reduce((acc, [, q]) => acc + Number(q), 0);
  const maxTotal = Math.max(sum(bids), sum(asks));
  const qtyDecimals = Math.max(0, ...[...bids, ...asks].map(([, q]) => decimals(q)));
  $("asks").replaceChildren(...ladderRows(asks, "ask", maxTotal, qtyDecimals).reverse());
  $("bids").replaceChildren(...ladderRows(bids, "bid", maxTotal, qtyDecimals));
  if (bids.length && asks.length) {
    const spread = Number(asks[0][0]) - Number(bids[0][0]);
    const mid = (Number(asks[0][0]) + Number(bids[0][0])) / 2;
    $("spread").textContent = `spread ${spread.toFixed(decimals(asks[0][0]))} (${(spread / mid * 1e4).toFixed(2)} bp)`;
  } else {
    $("spread").textContent = "—";
  }
}

/** The ladder's feed and checksum state, from the client's statistics of its stream. */
function renderLadderState(streams) {
  const {stream, speed, refused} = ladderState();
  const feed = $("book-feed");
  feed.dataset.stream = stream;
  feed.textContent = speed ? `merged every ${speed}` : "every diff";
  feed.title = refused ? `${stream}${LADDER_SPEED} is not served (${refused}): ${stream} shows every diff`
    : `${stream}: a snapshot of the server's book, then its diffs merged every ${speed}`;
  feed.classList.toggle("fallback", Boolean(refused));
  const s = streams[stream];
  const {checked, mismatches} = s ? s.checksums : {checked: 0, mismatches: 0};
  const node = $("book-checksum");
  let state, text;
  if (mismatches) {
    const at = mismatchAt.get(stream);
    state = "mismatch";
    text = `checksum ✗ ${mismatches} mismatch${mismatches > 1 ? "es" : ""}` +
      `${at ? ` (last ${clock(at).slice(0, 8)})` : ""}, ${s.status === "live" ? "resynced" : "resyncing"}` +
      ` · ${checked} checked`;
  } else if (checked) {
    state = "ok";
    text = `checksum ✓ ${checked} checked`;
  } else if (!s || !s.count) {
    state = "pending";
    text = "checksum …";
  } else {
    state = "none";
    text = "no checksums";
  }
  node.dataset.state = state;
  node.textContent = text;
}

function renderTape() {
  $("tape").replaceChildren(...trades.map((t) => {
    // m: the buyer is the maker, so the aggressor (taker) sold.
    const row = el("div", `row ${t.m ? "sell" : "buy"}`);
    row.title = t.m ? "sell (buyer is maker)" : "buy (seller is maker)";
    row.append(el("span", "price", t.p), el("span", "qty", t.q), el("span", "time", clock(t.T)));
    return row;
  }));
}

function renderStatus() {
  const conn = $("connection");
  conn.dataset.state = client.state;
  $("connection-state").textContent = client.state === "reconnecting" && client.attempts
    ? `reconnecting (attempt ${client.attempts})` : client.state;
  $("reconnects").textContent = client.reconnects;
  $("failures").textContent = client.failures;
  $("resumes").textContent = client.resumes;
  const streams = client.streams;
  const status = (name) => (streams[name] ? streams[name].status : "syncing");
  for (const [id, label, name] of [["book", "book-status", ladderStream(market)],
                                   ["tape-panel", "tape-status", `trade.${market}`],
                                   ["ticker", "ticker-status", `ticker.${market}`]]) {
    $(id).dataset.status = status(name);
    $(label).textContent = status(name);
  }
  const body = $("streams");
  const names = Object.keys(streams).sort();
  if (body.children.length !== names.length || [...body.children].some((row, i) => row.dataset.stream !== names[i])) {
    body.replaceChildren(...names.map((name) => {
      const row = el("tr");
      row.dataset.stream = name;
      row.append(el("td", "name", name), el("td", "status"), el("td", "seq"), el("td", "rate"), el("td", "gaps"));
      return row;
    }));
  }
  for (const row of body.children) {
    const s = streams[row.dataset.stream];
    row.dataset.status = s.status;
    row.children[1].textContent = s.status;
    row.children[2].textContent = s.lastSeq ?? "—";
    row.children[3].textContent = s.rate.toFixed(1);
    row.children[4].textContent = s.gaps;
  }
  renderLadderState(streams);
}

function render() {
  if (dirty.markets) renderMarkets();
  if (dirty.ticker) renderTicker();
  if (dirty.book) renderBook();
  if (dirty.tape) renderTape();
  renderStatus();
  dirty.markets = dirty.ticker = dirty.book = dirty.tape = false;
}

// -- events -----------------------------------------------------------------------

client.addEventListener("message", (event) => {
  const {stream, data} = event.detail;
  if (data.e === "ticker") {
    tickers.set(data.s, data);
    dirty.markets = true;
    if (data.s === market) dirty.ticker = true;
  } else if (data.e === "trade" && stream === `trade.${market}`) {
    trades.unshift(data);
    if (trades.length > TAPE_ROWS) trades.length = TAPE_ROWS;
    dirty.tape = true;
  } else if (data.e === "unsubscribed" && speedMarket(stream) !== null) {
    // The server accepted the speed stream, then found it cannot serve it (no book).
    fallBack(speedMarket(stream), stream, data.msg || data.reason);
  }
});
client.addEventListener("book", (event) => {
  const {stream, book} = event.detail;
  const m = speedMarket(stream);
  // The speed stream is served (a snapshot of the server's book): the standby plain stream goes.
  if (m !== null && !plainLadder.has(m) && book.status === "synced" && client.book(`depth.${m}`)) {
    client.unsubscribe(`depth.${m}`);
  }
  if (stream === ladderStream(market)) dirty.book = true;
});

/**
 * The server does not serve market m's speed stream: not an error (a server without update
 * speeds, a stream without snapshots).  The ladder shows plain depth.<m> (the standby, or asked
 * for now after a reconnect), and says so in a grey line and on the ladder's feed label.
 */
function fallBack(m, stream, reason) {
  if (plainLadder.has(m)) return;
  plainLadder.set(m, reason);
  log(`${stream} not served (${reason}): the ladder shows every diff of depth.${m}`);
  client.unsubscribe(stream);   // after a refusal, the client has already forgotten it
  if (m === market) client.subscribe(`depth.${m}`);
  dirty.book = true;
}

function closed({code, reason, opened}) {
  // What the close event said: 1001 "server shutting down", 1006 (no close frame) ...
  const what = code ? `${code}${reason ? ` ${reason}` : ""}` : reason || "";
  return opened ? `disconnected${what ? ` (${what})` : ""}` : `connection failed${what ? ` (${what})` : ""}`;
}

client.addEventListener("state", (event) => {
  const {state, delay, attempt} = event.detail;
  if (state === "reconnecting" && delay !== undefined) {
    log(`${closed(event.detail)}; reconnecting in ${(delay / 1000).toFixed(1)} s (attempt ${attempt})`,
        event.detail.opened ? "bad" : "warn");
  } else if (state === "open") log(client.reconnects ? `reconnected (${client.reconnects})` : `connected to ${wsUrl}`, "ok");
  else if (state !== "reconnecting") log(state);
});
client.addEventListener("gap", (event) => {
  const {stream, reason, msg, expected, got} = event.detail;
  if (reason === "checksum mismatch") mismatchAt.set(stream, Date.now());
  log(`gap on ${stream}: ${reason}${msg ? ` (${msg})` : ""}${expected !== undefined ? ` (expected ${expected}, got ${got})` : ""}`, "bad");
  dirty.book = true;
});
client.addEventListener("resume", (event) => log(`resumed ${event.detail.stream} after seq ${event.detail.since}`, "ok"));
client.addEventListener("refused", (event) => {
  const {stream, reason} = event.detail;
  const m = speedMarket(stream);
  if (m === null) log(`refused ${stream}: ${reason}`, "bad");
  else fallBack(m, stream, reason);
});
client.addEventListener("servererror", (event) => log(`server: ${event.detail.msg}`, "warn"));
client.addEventListener("status", (event) => {
  const {stream, status} = event.detail;
  if (status === "stale") log(`${stream}: no data for ${client.options.staleAfter / 1000} s`, "warn");
  dirty.book = true;
});

Object.defineProperty(window, "ladder", {get: ladderState});
client.connect(wsUrl);
client.subscribe(markets.map((m) => `ticker.${m}`), {snapshot: true});
client.subscribe(marketStreams(market));
render();
setInterval(render, 100);
