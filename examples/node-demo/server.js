#!/usr/bin/env node
// The redirector demo application in plain Node.js (no packages): an HTTP/1.1 server with a
// session per client address (a counter and the last few counts), whose sessions move with
// their clients through the redirector agent's application hook (docs/app-protocol.md,
// version 1).
//
//   node server.js --name A --listen 198.18.0.10:80 [--hook /run/redirector/a-app.sock --service ADDR]
//                  [--freeze-wait-ms MS] [--idle-close-ms MS]
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
// frozen and imported sessions stay tentative; on reconnecting it reports them (`pending`)
// and the agent answers each with commit or abort. A request of a frozen client waits for
// the outcome up to --freeze-wait-ms (default 10000), then gets a 503 (never the frozen
// session). Hook events are logged to stderr as `hook: ...` lines.
'use strict';

const http = require('http');
const net = require('net');

function arg(name) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const name = arg('--name');
const listen = arg('--listen');
if (!name || !listen) {
  console.error('usage: node server.js --name NAME --listen HOST:PORT [--hook SOCKET --service ADDR] [--freeze-wait-ms MS] [--idle-close-ms MS]');
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
const HISTORY = 5;
const VERSION = 1;

// A client address in the agent's form: IPv4 as a.b.c.d (a dual-stack listener reports IPv4
// clients as ::ffff:a.b.c.d), IPv6 compressed and lower-case (RFC 5952). null if not one.
function canon(addr) {
  if (typeof addr !== 'string') return null;
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(addr);
  if (m) addr = m[1];
  if (net.isIPv4(addr)) return addr;
  if (!net.isIPv6(addr)) return null;
  // The URL parser writes IPv6 hosts in the canonical form.
  const host = new URL(`http://[${addr}]/`).hostname.slice(1, -1);
  const hex = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(host);
  if (hex) {
    const [hi, lo] = [parseInt(hex[1], 16), parseInt(hex[2], 16)];
    return `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`;
  }
  return host;
}

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
  const client = canon(socket.remoteAddress);
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
  const e = entry(canon(socket.remoteAddress));
  e.moved = false;
  socket.busy = false;
  idleFrom(socket);
  e.sockets.add(socket);
  socket.on('close', () => e.sockets.delete(socket));
});

const [host, port] = [listen.slice(0, listen.lastIndexOf(':')).replace(/^\[|\]$/g, ''), Number(listen.slice(listen.lastIndexOf(':') + 1))];
server.listen(port, host, () => console.error(`listening on ${listen} as ${name}`));

// ---- the hook ----------------------------------------------------------------------------

function blob(s) {
  return Buffer.from(JSON.stringify({ count: s.count, history: s.history })).toString('base64');
}

// Hand-overs not seen end, from the sessions' own state: reported when registering.
function pending() {
  const byHandoff = new Map();
  const add = (h, role, c) => {
    if (!byHandoff.has(h)) byHandoff.set(h, { handoff: h, role, clients: [] });
    byHandoff.get(h).clients.push(c);
  };
  for (const [c, e] of clients) {
    if (e.frozen) add(e.frozen, 'export', c);
    if (e.imported) add(e.imported, 'import', c);
  }
  return [...byHandoff.values()];
}

function handle(req) {
  const h = req.handoff;
  switch (req.op) {
    case 'export': {
      // Freeze every listed client (no session may be created for one meanwhile); send the
      // sessions of those that have one.
      const sessions = [];
      for (const c of req.clients || []) {
        const client = canon(c);
        if (!client) continue;
        const e = entry(client);
        e.frozen = h;
        if (e.session) sessions.push({ client, blob: blob(e.session) });
      }
      console.error(`hook: export ${h}: froze ${(req.clients || []).length} clients, ${sessions.length} sessions`);
      return { id: req.id, ok: true, sessions };
    }
    case 'import': {
      const parsed = [];
      for (const s of req.sessions || []) {
        const client = canon(s.client);
        let v;
        try {
          v = JSON.parse(Buffer.from(s.blob, 'base64').toString());
        } catch (err) {
          return { id: req.id, ok: false, error: `bad session blob for ${s.client}` };
        }
        if (!client || typeof v.count !== 'number' || !Array.isArray(v.history)) {
          return { id: req.id, ok: false, error: `bad session for ${s.client}` };
        }
        parsed.push([client, v]);
      }
      for (const [c, v] of parsed) {
        const e = entry(c);
        e.session = { count: v.count, history: v.history };
        e.moved = false;
        e.frozen = null;
        e.imported = h;
      }
      console.error(`hook: import ${h}: ${parsed.length} sessions (tentative until the commit)`);
      return { id: req.id, ok: true };
    }
    case 'commit': {
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
      return { id: req.id, ok: true };
    }
    case 'abort': {
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
      return { id: req.id, ok: true };
    }
    default:
      return { id: req.id, ok: false, error: `unknown op ${req.op}` };
  }
}

function connectHook() {
  const sock = net.connect(hookPath);
  let buf = '';
  sock.on('connect', () => {
    const p = pending();
    sock.write(JSON.stringify({ op: 'register', service, version: VERSION, pending: p }) + '\n');
    if (p.length) console.error(`hook: registering with ${p.length} unfinished hand-over(s)`);
  });
  sock.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      let req;
      try {
        req = JSON.parse(line);
      } catch (err) {
        console.error('hook: ignoring a line that is not JSON from the agent');
        continue;
      }
      if (req.op === 'registered') continue;
      if (req.op === 'error') {
        // Refused or replaced: reconnect (and register again).
        console.error(`hook: the agent says: ${req.error}`);
        sock.destroy();
        return;
      }
      sock.write(JSON.stringify(handle(req)) + '\n');
    }
  });
  sock.on('error', () => {});
  sock.on('close', () => {
    // Unfinished hand-overs stay as they are (frozen, tentative) until the agent says.
    setTimeout(connectHook, 500);
  });
}

if (hookPath) connectHook();
