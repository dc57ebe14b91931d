#!/usr/bin/env node
// The redirector demo application in Node.js (no npm packages): an HTTP/1.1 server with a
// session per client address (a counter and the last few counts), whose sessions move with
// their clients through the redirector agent's application hook (docs/app-protocol.md), which
// this repository's Node.js SDK (redirector-sdk-node) speaks for it.
//
//   node server.js --name A --listen 198.18.0.10:80 [--hook /run/redirector/a-app.sock --service ADDR]
//                  [--freeze-wait-ms MS] [--idle-close-ms MS] [--hook-version 1|2|3]
//
// Connections persist as HTTP/1.1 says (RFC 9112 section 9.3): an HTTP/1.1 connection stays
// open for the next request unless the request says `Connection: close`; an HTTP/1.0 one only
// if the request says `Connection: keep-alive`. Every response says which (`Connection:
// keep-alive` or `Connection: close`); after a `close` answer the server closes the connection
// first. --idle-close-ms (default 60000; 0: never) closes first a connection on which no
// request arrived for that long since it opened or since its last answer. It is also Node's
// keepAliveTimeout (to which Node 20 adds 1 s of its own; the demo times the wait itself).
//
// The application never decides how a hand-over ends: if the hook drops, frozen clients stay
// frozen and imported sessions stay tentative (the SDK reports them when it reconnects, and the
// agent answers each with commit or abort). A request of a frozen client waits for the outcome
// up to --freeze-wait-ms (default 10000), then gets a 503 (never the frozen session). Hook
// events are logged to stderr as `hook: ...` lines.
//
// Open connections move with their sessions (hook protocol version 3, when the agent's
// `live_moves` lets them): an export hands over the listed clients' connections that are idle
// at a request boundary (every request begun on it was read to its end and answered, nothing
// of a next one read: the HTTP parser counts the messages it begins), with an empty blob, and
// those whose one request in progress waits on the frozen session (read to its end, nothing of
// its answer written, nothing of a next one read), with that request as their blob (rebuilt
// from what the parser made of it: request line, headers, body); the waiting handler lets go
// of it without a byte, and the request is answered where the connection goes. The others stay
// and are closed after the commit as before. Connections the agent brings (or gives back) are
// served as if just accepted: their blob is parsed first, as bytes the client sent.
'use strict';

const http = require('http');
const { attach, normalizeClient } = require('../../redirector-sdk-node');

function arg(name) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const name = arg('--name');
const listen = arg('--listen');
if (!name || !listen) {
  console.error('usage: node server.js --name NAME --listen HOST:PORT [--hook SOCKET --service ADDR] [--freeze-wait-ms MS] [--idle-close-ms MS] [--hook-version 1|2|3]');
  process.exit(2);
}
const hookPath = arg('--hook');
const service = arg('--service') || listen;
const freezeWait = Number(arg('--freeze-wait-ms') || 10000);
const idleClose = Number(arg('--idle-close-ms') ?? 60000);
if (!Number.isInteger(idleClose) || idleClose < 0) {
  console.error(`bad --idle-close-ms ${arg('--idle-close-ms')}: a number of milliseconds`);
  process.exit(2);
}
// Without --hook-version, the newest version the agent speaks.
const hookVersion = arg('--hook-version') === undefined ? undefined : Number(arg('--hook-version'));
if (hookVersion !== undefined && hookVersion !== 1 && hookVersion !== 2 && hookVersion !== 3) {
  console.error(`bad --hook-version ${arg('--hook-version')}: 1, 2 or 3`);
  process.exit(2);
}
const HISTORY = 5;
// A request waiting on a frozen session keeps its body up to this many bytes, to move with its
// connection; a longer one (dropped) keeps its connection here.
const BODY_KEPT = 64 * 1024;

// client address -> { session: null | { count, history }, frozen, moved, imported, waiters, sockets }
const clients = new Map();

function entry(client) {
  let e = clients.get(client);
  if (!e) {
    e = { session: null, frozen: null, moved: false, imported: null, waiters: new Set(), sockets: new Set() };
    clients.set(client, e);
  }
  return e;
}

// Whether the connection stays open after answering `req` (RFC 9112 section 9.3): not if it
// says `Connection: close`; HTTP/1.1 otherwise; HTTP/1.0 only with `Connection: keep-alive`.
function keepAlive(req) {
  const tokens = String(req.headers.connection || '').toLowerCase().split(',').map((t) => t.trim());
  if (tokens.includes('close')) return false;
  if (req.httpVersionMajor === 1 && req.httpVersionMinor >= 1) return true;
  return req.httpVersionMajor === 1 && req.httpVersionMinor === 0 && tokens.includes('keep-alive');
}

// Per connection: the messages its HTTP parser began (a byte of a request other than the CR
// and LF allowed between requests makes one), the requests the server was given and those it
// finished answering, the last request; whether the count cannot be trusted, whether the
// connection is being handed over, the request waiting on a frozen session.
const kBegun = Symbol('messages begun');
const kRequests = Symbol('requests');
const kAnswered = Symbol('requests answered');
const kLast = Symbol('last request');
const kUntracked = Symbol('messages not counted');
const kDetached = Symbol('handed to the hook');
const kWaiting = Symbol('request waiting');

// Counts the messages a connection's parser begins: Node's HTTP parser calls its
// kOnMessageBegin slot (which the server leaves empty) with the parser as `this`, whose
// `socket` is the connection (parsers are pooled: it is looked up at each call).
function onMessageBegin() {
  const socket = this.socket;
  if (socket) socket[kBegun] = (socket[kBegun] ?? 0) + 1;
}

function trackMessages(socket) {
  socket[kBegun] = 0;
  socket[kRequests] = 0;
  socket[kAnswered] = 0;
  socket[kLast] = null;
  const parser = socket.parser;
  const slot = parser?.constructor?.kOnMessageBegin;
  if (parser && typeof slot === 'number') parser[slot] = onMessageBegin;
  else socket[kUntracked] = true;
}

// Whether a connection is idle at a request boundary, so that it may move: open both ways,
// every message its parser began was a request read to its end and answered, nothing left to
// write, nothing read and not parsed. Decided in one go with stopping its reading (`detach`):
// what the client sends from then on stays in the kernel and moves with the connection.
function atBoundary(socket) {
  return !socket[kUntracked] && !socket[kDetached] && !socket.destroyed && !socket.connecting && socket.readable && socket.writable
    && socket[kBegun] === socket[kRequests] && socket[kRequests] === socket[kAnswered]
    && (socket[kLast] === null || socket[kLast].complete) && !socket._httpMessage
    && socket.readableLength === 0 && socket.writableLength === 0;
}

// A connection's request that waits on its client's frozen session, and its bytes (its blob),
// if the connection may move with it: open both ways, the only request in progress on it (every
// message its parser began was a request, every one before it answered), read to its end (its
// body kept), nothing of its answer written (no interim `100 Continue` either: no `Expect`),
// nothing read and not parsed, nothing left to write. Else null. Decided in one go with
// stopping its reading (`detach`), as for an idle one.
function waitingRequest(socket) {
  const w = socket[kWaiting];
  if (!w || w.handed || socket[kUntracked] || socket[kDetached] || socket.destroyed || socket.connecting || !socket.readable || !socket.writable) return null;
  const { req, res } = w;
  if (socket[kBegun] !== socket[kRequests] || socket[kRequests] !== socket[kAnswered] + 1 || socket[kLast] !== req) return null;
  if (!req.complete || !req.readableEnded || w.body === null || req.headers.expect !== undefined) return null;
  // All its headers (the parser keeps at most maxHeaderPairs entries, names and values).
  const most = socket.parser?.maxHeaderPairs ?? 0;
  if (most > 0 && req.rawHeaders.length >= most) return null;
  if (res.headersSent || res.writableEnded || socket._httpMessage !== res) return null;
  if (socket.readableLength !== 0 || socket.writableLength !== 0) return null;
  return { w, blob: requestBytes(req, w.body) };
}

// A request as HTTP/1.x text, as its client sent it but for the framing of a chunked body
// (the parser took the chunks apart: one chunk, then the trailers). Header text is Latin-1, as
// the parser read it.
function requestBytes(req, body) {
  let head = `${req.method} ${req.url} HTTP/${req.httpVersion}\r\n`;
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) head += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
  const parts = [Buffer.from(`${head}\r\n`, 'latin1')];
  const size = body.reduce((n, b) => n + b.length, 0);
  if (req.headers['transfer-encoding'] !== undefined) {
    if (size > 0) parts.push(Buffer.from(`${size.toString(16)}\r\n`), ...body, Buffer.from('\r\n'));
    let tail = '0\r\n';
    for (let i = 0; i + 1 < req.rawTrailers.length; i += 2) tail += `${req.rawTrailers[i]}: ${req.rawTrailers[i + 1]}\r\n`;
    parts.push(Buffer.from(`${tail}\r\n`, 'latin1'));
  } else {
    parts.push(...body);
  }
  return Buffer.concat(parts);
}

// Takes a connection away from the HTTP server for the hook: no more reading (the server's own
// pause handler stops the handle), no timeout, out of the server's list of connections (its
// header and request timeouts, closeIdleConnections). The hook passes its descriptor on and
// closes this copy (silently: the agent holds the connection).
function detach(socket) {
  socket[kDetached] = true;
  socket.pause();
  if (socket._handle) {
    socket._handle.reading = false;
    socket._handle.readStop();
  }
  socket.idleTimer = false;
  socket.setTimeout(0);
  socket.parser?.remove?.();
}

// A detached connection the hook kept after all (it could not leave as it was): served again,
// its waiting request (if it went with one) waiting again, here.
function reattach(socket, e) {
  socket[kDetached] = false;
  e.sockets.add(socket);
  socket[kWaiting]?.takeBack();
  socket.resume(); // the server's resume handler starts the handle's reading again
  idleFrom(socket);
}

// Runs the requests waiting for this client's hand-over to end.
function wake(e) {
  const waiters = [...e.waiters];
  e.waiters.clear();
  for (const w of waiters) w();
}

const server = http.createServer((req, res) => {
  const socket = req.socket;
  const client = normalizeClient(socket.remoteAddress);
  const e = entry(client);
  socket.busy = true;
  socket[kRequests] += 1;
  // Each request begins a message: fewer counted means the count does not work here.
  if (socket[kBegun] < socket[kRequests]) socket[kUntracked] = true;
  socket[kLast] = req;
  res.on('finish', () => {
    socket[kAnswered] += 1;
  });
  if (socket.idleTimer) {
    // A request arrived: the idle wait is over (a frozen session's wait is not bound by it).
    socket.idleTimer = false;
    socket.setTimeout(server.timeout || 0);
  }
  // Setting the Connection header decides it for Node too: `close` ends the connection after
  // the answer (the server closes first), `keep-alive` keeps it.
  const connection = keepAlive(req) ? 'keep-alive' : 'close';
  if (connection === 'keep-alive') {
    // After Node's own handler, which sets keepAliveTimeout plus its 1 s: the idle wait
    // starts once the answer is sent.
    res.on('finish', () => idleFrom(socket));
  }
  // Set once the connection went to the hook with this request: from then on nothing answers it
  // here (its response is not attached to the connection either).
  let handed = false;
  const go = () => {
    if (handed) return;
    if (e.moved) {
      // The session lives elsewhere now: no answer; the client's retry opens a new
      // connection, which the kernel steers to the sibling.
      console.error(`closing a connection of ${client}: its session moved`);
      socket.destroy();
      return;
    }
    if (e.frozen) {
      // Frozen for too long: the session is neither forked nor lost; the client may retry.
      console.error(`answering 503 to ${client}: frozen by hand-over ${e.frozen} for over ${freezeWait} ms`);
      const body = JSON.stringify({ server: name, client, error: `session frozen by hand-over ${e.frozen}: retry later` });
      res.writeHead(503, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body), 'Retry-After': '1', Connection: connection });
      res.end(body);
      socket.busy = false;
      return;
    }
    if (!e.session) e.session = { count: 0, history: [] };
    const s = e.session;
    s.count += 1;
    s.history.push(s.count);
    if (s.history.length > HISTORY) s.history.shift();
    const body = JSON.stringify({ server: name, client, count: s.count, history: s.history });
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body), Connection: connection });
    res.end(body);
    socket.busy = false;
  };
  if (e.frozen) {
    // Wait for the hand-over to end, at most freezeWait; a waiter is removed when it runs, when
    // its connection goes, or when its connection goes to the hook with it, so a later wake
    // never answers (or counts) for nobody. Its body is kept: the request may move with its
    // connection (`waitingRequest`).
    const w = { req, res, body: [], handed: false, handOver: null, takeBack: null };
    let kept = 0;
    req.on('data', (chunk) => {
      if (w.body === null) return;
      kept += chunk.length;
      if (kept > BODY_KEPT) w.body = null;
      else w.body.push(chunk);
    });
    let timer = null;
    const wait = () => {
      timer = setTimeout(timeout, freezeWait);
      e.waiters.add(waiter);
      socket.once('close', done);
      socket[kWaiting] = w;
    };
    const done = () => {
      clearTimeout(timer);
      e.waiters.delete(waiter);
      socket.removeListener('close', done);
      if (socket[kWaiting] === w) socket[kWaiting] = null;
    };
    const waiter = () => {
      done();
      if (socket.destroyed || handed) return;
      if (e.frozen) {
        // Still frozen (given back by the hook), or frozen again by another hand-over
        // meanwhile: wait again (the bound counts from now).
        console.error(`a request of ${client} waits: frozen by hand-over ${e.frozen}`);
        wait();
        return;
      }
      go();
    };
    const timeout = () => {
      done();
      if (!socket.destroyed) go();
    };
    // The connection goes to the hook with this request (its blob): no answer from here, no
    // timer, the response detached from the connection (nothing it is told can reach it).
    w.handOver = () => {
      done();
      handed = true;
      w.handed = true;
      socket[kWaiting] = w; // until the hook passes it on (or gives it back: `takeBack`)
      res.detachSocket(socket);
    };
    // It did not leave after all (given back before the outcome applies): the request waits
    // here again, the bound counting from now, and the outcome decides as for any other.
    w.takeBack = () => {
      if (!w.handed) return;
      handed = false;
      w.handed = false;
      socket[kWaiting] = null;
      if (!socket.destroyed && !socket._httpMessage) res.assignSocket(socket);
      waiter();
    };
    console.error(`a request of ${client} waits: frozen by hand-over ${e.frozen}`);
    wait();
  } else {
    req.resume();
    go();
  }
});
// Idle connections close after --idle-close-ms (0: never).
server.keepAliveTimeout = idleClose;

// Starts the idle wait of a connection with no request in progress: if it lasts
// --idle-close-ms, Node's 'timeout' handler destroys the socket (the server closes first).
function idleFrom(socket) {
  if (idleClose > 0 && !socket.busy && !socket.destroyed) {
    socket.idleTimer = true;
    socket.setTimeout(idleClose);
  }
}

// Connections the server was given (accepted, or brought by the hook).
let connectionsTaken = 0;

// Turns the event loop until a turn takes no connection: then none waits in the listener's
// queue. Node accepts one waiting connection per turn (a loaded demo had 15 waiting after two
// turns). Bounded by 1 s.
async function acceptWaiting() {
  const turn = () => new Promise((r) => setImmediate(r));
  const end = Date.now() + 1000;
  // From a check phase, the next turn's poll phase comes before the next check.
  await turn();
  for (;;) {
    const before = connectionsTaken;
    await turn();
    if (connectionsTaken === before || Date.now() > end) return;
  }
}

// Also the connections the hook brings: `server.emit('connection', socket)`.
server.on('connection', (socket) => {
  connectionsTaken += 1;
  const e = entry(normalizeClient(socket.remoteAddress));
  // It came here: the client is back (a commit takes the listener's queue before it applies).
  e.moved = false;
  socket.busy = false;
  trackMessages(socket); // after the server's own listener, which gave it its parser
  idleFrom(socket);
  e.sockets.add(socket);
  socket.on('close', () => e.sockets.delete(socket));
});

const [host, port] = [listen.slice(0, listen.lastIndexOf(':')).replace(/^\[|\]$/g, ''), Number(listen.slice(listen.lastIndexOf(':') + 1))];
server.listen(port, host, () => console.error(`listening on ${listen} as ${name}`));

// ---- the hook: the sessions' side of hand-overs, through redirector-sdk ------------------

function blob(s) {
  return Buffer.from(JSON.stringify({ count: s.count, history: s.history }));
}

const sessions = {
  // Freeze every listed client (no session may be created for one meanwhile); send the
  // sessions of those that have one.
  export(h, list) {
    const out = [];
    for (const client of list) {
      const e = entry(client);
      e.frozen = h;
      if (e.session) out.push([client, blob(e.session)]);
    }
    console.error(`hook: export ${h}: froze ${list.length} clients, ${out.length} sessions`);
    return out;
  },
  // All or nothing: a session that is not ours refuses the whole hand-over.
  import(h, list) {
    const parsed = list.map(([client, b]) => {
      let v;
      try {
        v = JSON.parse(b.toString());
      } catch (err) {
        throw new Error(`bad session blob for ${client}`);
      }
      if (typeof v?.count !== 'number' || !Array.isArray(v.history)) throw new Error(`bad session for ${client}`);
      return [client, v];
    });
    for (const [c, v] of parsed) {
      const e = entry(c);
      e.session = { count: v.count, history: v.history };
      e.moved = false;
      e.frozen = null;
      e.imported = h;
    }
    console.error(`hook: import ${h}: ${parsed.length} sessions (tentative until the commit)`);
  },
  // Version 3, right after the export (its clients frozen): the listed clients' connections
  // that are idle at a request boundary (empty blob) or whose request waits on the frozen
  // session (that request's bytes), taken from the server; the others stay (closed after the
  // commit, as in version 2).
  async connections(h, list) {
    // First the event loop turns (the clients are frozen: their requests wait): the
    // connections the kernel accepted already, which this server has not taken yet, come in,
    // and (5 ms more) requests on their way are read. Then those in the middle of a request or an answer
    // get up to a second to reach a point where they can go.
    await acceptWaiting();
    await new Promise((r) => setTimeout(r, 5));
    const inBetween = () => list.some((c) => [...(clients.get(c)?.sockets ?? [])].some((s) => !atBoundary(s) && waitingRequest(s) === null));
    // A listed client with no connection here yet: the agent lists clients by the connections
    // the kernel counts, so its connection is most likely still in the listener's queue (a
    // loaded machine accepts late). Left behind, it would be accepted after the hand-over, its
    // request would wait on the moved session and the connection close after the commit (a
    // CI run saw 3 of 200 clients retry so). Awaited up to 200 ms (a client listed with no
    // connection at all costs the freeze that much).
    const missing = () => list.some((c) => !(clients.get(c)?.sockets.size));
    const [deadline, arrivals] = [Date.now() + 1000, Date.now() + 200];
    while ((inBetween() || (missing() && Date.now() < arrivals)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 2));
    // From here on, synchronously: what is checked is what goes.
    const out = [];
    let [idle, waiting, busy] = [0, 0, 0];
    for (const client of list) {
      const e = clients.get(client);
      if (!e) continue;
      for (const socket of e.sockets) {
        if (atBoundary(socket)) {
          detach(socket);
          e.sockets.delete(socket);
          out.push({ client, socket, blob: Buffer.alloc(0) });
          idle += 1;
          continue;
        }
        const found = waitingRequest(socket);
        if (found === null) {
          busy += 1;
          continue;
        }
        detach(socket);
        found.w.handOver();
        e.sockets.delete(socket);
        out.push({ client, socket, blob: found.blob });
        waiting += 1;
      }
    }
    if (out.length || busy) console.error(`hook: export ${h}: handing over ${out.length} connections (${idle} idle, ${waiting} with a request waiting; ${busy} busy ones stay)`);
    return out;
  },
  // Version 3, before a commit or an abort: connections that came here, came back, or could not
  // leave; served as if just accepted, their blob (bytes the client sent, not parsed here: a
  // request that waited where the connection was) first. One that never left is this server's
  // still, as it was (its waiting request included).
  adopt(h, conns) {
    let [fresh, back] = [0, 0];
    for (const { client, socket, blob } of conns) {
      if (socket[kDetached]) {
        reattach(socket, entry(client));
        back += 1;
        continue;
      }
      if (blob.length > 0) socket.unshift(blob);
      server.emit('connection', socket);
      fresh += 1;
    }
    console.error(`hook: ${h}: adopted ${fresh} connections${back ? `, ${back} kept` : ''}`);
  },
  // The connections waiting in the listener's queue are accepted first: the agent steered the
  // moving clients' new connections elsewhere before it sent the commit, so a connection of one
  // of them still in the queue is one of its open connections here (closed below), not the
  // client coming back, which a connection accepted later means (`e.moved` is reset then).
  async commit(h) {
    await acceptWaiting();
    let [out, confirmed] = [0, 0];
    for (const e of clients.values()) {
      if (e.frozen === h) {
        out += 1;
        e.frozen = null;
        e.moved = true;
        e.session = null;
        for (const s of e.sockets) if (!s.busy) s.destroy();
        wake(e);
      }
      if (e.imported === h) {
        confirmed += 1;
        e.imported = null;
      }
    }
    console.error(`hook: commit ${h}: ${out} clients moved out, ${confirmed} imported sessions confirmed`);
  },
  abort(h) {
    let [unfrozen, dropped] = [0, 0];
    for (const e of clients.values()) {
      if (e.frozen === h) {
        unfrozen += 1;
        e.frozen = null;
        wake(e);
      }
      if (e.imported === h) {
        dropped += 1;
        e.imported = null;
        e.session = null;
      }
    }
    console.error(`hook: abort ${h}: ${unfrozen} clients unfrozen, ${dropped} imported sessions dropped`);
  },
};

if (hookPath) attach({ socket: hookPath, service, sessions, version: hookVersion, log: (m) => console.error(`hook: ${m}`) });
