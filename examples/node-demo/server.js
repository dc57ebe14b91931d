#!/usr/bin/env node
// The redirector demo application in plain Node.js (no packages): an HTTP/1.1 server with a
// session per client address (a counter and the last few counts), whose sessions move with
// their clients through the redirector agent's application hook (docs/app-protocol.md).
//
//   node server.js --name A --listen 198.18.0.10:80 [--hook /run/redirector/a-app.sock --service ADDR]
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
  console.error('usage: node server.js --name NAME --listen HOST:PORT [--hook SOCKET --service ADDR]');
  process.exit(2);
}
const hookPath = arg('--hook');
const service = arg('--service') || listen;
const HISTORY = 5;

// client address -> { count, history, frozen, moved, imported, waiters, sockets }
const clients = new Map();

function entry(client) {
  let e = clients.get(client);
  if (!e) {
    e = { count: 0, history: [], frozen: null, moved: false, imported: null, waiters: [], sockets: new Set() };
    clients.set(client, e);
  }
  return e;
}

function wake(e) {
  const waiters = e.waiters;
  e.waiters = [];
  for (const w of waiters) w();
}

const server = http.createServer((req, res) => {
  const socket = req.socket;
  const client = socket.remoteAddress;
  const e = entry(client);
  socket.busy = true;
  req.resume();
  const go = () => {
    if (e.moved || e.frozen) {
      // The session lives elsewhere now: no answer; the client's retry opens a new
      // connection, which the kernel steers to the sibling.
      socket.destroy();
      return;
    }
    e.count += 1;
    e.history.push(e.count);
    if (e.history.length > HISTORY) e.history.shift();
    const body = JSON.stringify({ server: name, client, count: e.count, history: e.history });
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body), Connection: 'keep-alive' });
    res.end(body);
    socket.busy = false;
  };
  if (e.frozen) {
    // Wait for the hand-over to end (bounded: the agent aborts hung hand-overs sooner).
    const timer = setTimeout(() => socket.destroy(), 10000);
    e.waiters.push(() => { clearTimeout(timer); go(); });
  } else {
    go();
  }
});
server.keepAliveTimeout = 60000;
server.on('connection', (socket) => {
  const e = entry(socket.remoteAddress);
  e.moved = false;
  socket.busy = false;
  e.sockets.add(socket);
  socket.on('close', () => e.sockets.delete(socket));
});

const [host, port] = [listen.slice(0, listen.lastIndexOf(':')).replace(/^\[|\]$/g, ''), Number(listen.slice(listen.lastIndexOf(':') + 1))];
server.listen(port, host, () => console.error(`listening on ${listen} as ${name}`));

// ---- the hook ----------------------------------------------------------------------------

function blob(e) {
  return Buffer.from(JSON.stringify({ count: e.count, history: e.history })).toString('base64');
}

function handle(req, open) {
  const h = req.handoff;
  switch (req.op) {
    case 'registered':
      return null;
    case 'export': {
      open.add(h);
      const sessions = [];
      for (const c of req.clients || []) {
        const e = clients.get(c);
        if (!e) continue;
        e.frozen = h;
        sessions.push({ client: c, blob: blob(e) });
      }
      return { id: req.id, ok: true, sessions };
    }
    case 'import': {
      open.add(h);
      const parsed = [];
      for (const s of req.sessions || []) {
        let v;
        try {
          v = JSON.parse(Buffer.from(s.blob, 'base64').toString());
        } catch (err) {
          return { id: req.id, ok: false, error: `bad session blob for ${s.client}` };
        }
        if (typeof v.count !== 'number' || !Array.isArray(v.history)) {
          return { id: req.id, ok: false, error: `bad session for ${s.client}` };
        }
        parsed.push([s.client, v]);
      }
      for (const [c, v] of parsed) {
        const e = entry(c);
        e.count = v.count;
        e.history = v.history;
        e.moved = false;
        e.frozen = null;
        e.imported = h;
      }
      return { id: req.id, ok: true };
    }
    case 'commit':
      open.delete(h);
      for (const e of clients.values()) {
        if (e.frozen === h) {
          e.frozen = null;
          e.moved = true;
          e.count = 0;
          e.history = [];
          for (const s of e.sockets) if (!s.busy) s.destroy();
          wake(e);
        }
        if (e.imported === h) e.imported = null;
      }
      return { id: req.id, ok: true };
    case 'abort':
      open.delete(h);
      abort(h);
      return { id: req.id, ok: true };
    default:
      return { id: req.id, ok: false, error: `unknown op ${req.op}` };
  }
}

function abort(h) {
  for (const e of clients.values()) {
    if (e.frozen === h) {
      e.frozen = null;
      wake(e);
    }
    if (e.imported === h) {
      e.imported = null;
      e.count = 0;
      e.history = [];
    }
  }
}

function connectHook() {
  const open = new Set();
  const sock = net.connect(hookPath);
  let buf = '';
  sock.on('connect', () => sock.write(JSON.stringify({ op: 'register', service }) + '\n'));
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
        continue;
      }
      const reply = handle(req, open);
      if (reply) sock.write(JSON.stringify(reply) + '\n');
    }
  });
  sock.on('error', () => {});
  sock.on('close', () => {
    // The agent went away mid-hand-over: undo what it started.
    for (const h of open) abort(h);
    setTimeout(connectHook, 500);
  });
}

if (hookPath) connectHook();
