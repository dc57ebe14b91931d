#!/usr/bin/env node
// The redirector demo application in Node.js (no npm packages): an HTTP/1.1 server with a
// session per client address (a counter and the last few counts), whose sessions move with
// their clients through the redirector agent's application hook (docs/app-protocol.md), which
// this repository's Node.js SDK (redirector-sdk-node) speaks for it.
//
//   node server.js --name A --listen 198.18.0.10:80 [--hook /run/redirector/a-app.sock --service ADDR]
//                  [--freeze-wait-ms MS] [--idle-close-ms MS] [--hook-version 1|2]
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
  console.error('usage: node server.js --name NAME --listen HOST:PORT [--hook SOCKET --service ADDR] [--freeze-wait-ms MS] [--idle-close-ms MS] [--hook-version 1|2]');
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
if (hookVersion !== undefined && hookVersion !== 1 && hookVersion !== 2) {
  console.error(`bad --hook-version ${arg('--hook-version')}: 1 or 2`);
  process.exit(2);
}
const HISTORY = 5;

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
  req.resume();
  const go = () => {
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
    // Wait for the hand-over to end, at most freezeWait; a waiter is removed when it runs or
    // when its connection goes, so a later wake never answers (or counts) for nobody.
    let timer = null;
    const done = () => {
      clearTimeout(timer);
      e.waiters.delete(waiter);
      socket.removeListener('close', done);
    };
    const waiter = () => {
      done();
      if (socket.destroyed) return;
      if (e.frozen) {
        // Another hand-over froze it meanwhile: wait again (the bound counts from now).
        e.waiters.add(waiter);
        timer = setTimeout(timeout, freezeWait);
        socket.once('close', done);
        return;
      }
      go();
    };
    const timeout = () => {
      done();
      if (!socket.destroyed) go();
    };
    timer = setTimeout(timeout, freezeWait);
    e.waiters.add(waiter);
    socket.once('close', done);
  } else {
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

server.on('connection', (socket) => {
  const e = entry(normalizeClient(socket.remoteAddress));
  e.moved = false;
  socket.busy = false;
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
  commit(h) {
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
