'use strict';
// The connection to the agent's hook socket: register, answer export/import/commit/abort
// through the application's callbacks, hand over and adopt open connections (version 3),
// reconnect, report unfinished hand-overs.

const { EventEmitter } = require('events');
const net = require('net');
const path = require('path');
const { MessageReader } = require('./framing');
const { normalizeClient } = require('./client');
const fds = require('./fds');

/** The newest hook protocol version this package speaks (it speaks 2 and 1 too). */
const VERSION = 3;
const RECONNECT_MS = 500;
// A big export answer leaves in pieces of about this size, the first as soon as it is ready.
const PIECE = 1 << 20;
const STALL_MS = 60_000;

// The version to offer on each socket path, once an agent refused a newer one there: the newer
// one is not asked again until the process ends (docs: negotiation).
const learned = new Map();

function message(err) {
  return err instanceof Error ? err.message : String(err);
}

/**
 * Connects to the agent's hook socket and serves `sessions` for `service`, reconnecting
 * until `close()`. See README.md for the options and the callbacks' contract.
 */
function attach(options) {
  return new Hook(options);
}

class Hook extends EventEmitter {
  constructor({ socket, service, sessions, version, reconnectMs = RECONNECT_MS, log = (m) => process.stderr.write(`redirector hook: ${m}\n`) } = {}) {
    super();
    if (typeof socket !== 'string') throw new TypeError('attach: `socket` is the path of the agent\'s hook socket');
    if (typeof service !== 'string' || !/^(\d+\.\d+\.\d+\.\d+|\[[0-9A-Fa-f:.]+\]):\d+$/.test(service)) {
      throw new TypeError(`attach: \`service\` is ADDRESS:PORT (IPv6 in brackets), not ${JSON.stringify(service)}`);
    }
    for (const f of ['export', 'import', 'commit', 'abort']) {
      if (typeof sessions?.[f] !== 'function') throw new TypeError(`attach: \`sessions.${f}\` must be a function`);
    }
    for (const f of ['connections', 'adopt']) {
      if (sessions[f] != null && typeof sessions[f] !== 'function') throw new TypeError(`attach: \`sessions.${f}\`, when given, must be a function`);
    }
    // The connections an application hands over come back when their hand-over aborts.
    if (sessions.connections && !sessions.adopt) throw new TypeError('attach: an application that hands connections over (`sessions.connections`) takes them back: `sessions.adopt` must be a function too');
    if (version !== undefined && version !== 1 && version !== 2 && version !== 3) throw new TypeError(`attach: \`version\` is 1, 2 or 3, not ${version}`);
    if (version === 3 && fds.whyNot()) throw new TypeError(`attach: version 3 passes descriptors, which this Node.js cannot: ${fds.whyNot()}`);
    this.path = socket;
    this.key = path.resolve(socket);
    this.service = service;
    this.sessions = sessions;
    this.version = version;
    this.reconnectMs = reconnectMs;
    this.log = log || (() => {});
    if (version === undefined && fds.whyNot()) this.log(`hook protocol version 2 at most (connections do not move): ${fds.whyNot()}`);
    // Hand-overs this application took part in and has not seen end, by name: { role, clients,
    // kept }, `kept` the connections the application offered for an export that did not leave
    // (given back with the outcome). They outlive a connection: reported when registering again.
    this.unfinished = new Map();
    // Requests run one at a time in arrival order, across connections too: an abort sent on a
    // new connection applies after the export still running from the old one.
    this.queue = Promise.resolve();
    this.conn = null;
    this.timer = null;
    this.closed = false;
    this.lastProblem = null;
    this.connect();
  }

  /** Stops serving: closes the connection and does not reconnect. Resolves once closed. */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    const conn = this.conn;
    if (!conn) return Promise.resolve();
    return new Promise((resolve) => {
      conn.sock.once('close', () => resolve());
      conn.sock.destroy();
    });
  }

  /** The register line's `pending`: unfinished hand-overs sorted by name (as UTF-8 bytes). */
  pending() {
    return [...this.unfinished]
      .sort(([a], [b]) => Buffer.compare(Buffer.from(a), Buffer.from(b)))
      .map(([handoff, { role, clients }]) => ({ handoff, role, clients }));
  }

  connect() {
    this.timer = null;
    if (this.closed) return;
    // Without descriptor passing (a Node.js without libuv IPC pipes), 2 is the newest.
    const version = this.version ?? learned.get(this.key) ?? (fds.whyNot() ? 2 : VERSION);
    const conn = { sock: null, version, registered: false, problem: null, fallback: false };
    conn.reader = new MessageReader(
      (msg, raw, handles) => this.received(conn, msg, raw, handles),
      (line, err) => this.unreadable(conn, line, err),
      (err) => {
        conn.problem ??= `a protocol error in the agent's lines (${err.message})`;
        conn.sock.destroy();
      },
    );
    // Version 3 reads and writes descriptors: an IPC pipe (lib/fds.js).
    const sock = version >= 3 ? fds.ipcSocket((h) => conn.reader.pushDescriptor(h)) : new net.Socket();
    conn.sock = sock;
    sock.connect(this.path);
    this.conn = conn;
    sock.on('connect', () => {
      const pending = this.pending();
      sock.write(`${JSON.stringify({ op: 'register', service: this.service, version, pending })}\n`);
      if (pending.length) this.log(`registering with ${pending.length} unfinished hand-over(s): the agent says how each ended`);
    });
    sock.on('data', (chunk) => conn.reader.push(chunk));
    sock.on('error', (err) => {
      conn.problem ??= err.message;
    });
    sock.on('close', () => {
      // Descriptors no line claimed: closed (the agent closes its copies when the connection
      // drops before the answer).
      for (const h of conn.reader.takeDescriptors()) fds.closeHandle(h);
      this.lost(conn);
    });
  }

  lost(conn) {
    this.conn = null;
    if (this.closed) return;
    const problem = conn.problem ?? 'the agent closed the connection';
    this.emit('disconnected', new Error(problem));
    // Said once per kind of trouble: an agent that is away is not logged twice a second.
    if (problem !== this.lastProblem) {
      this.log(`${problem}; reconnecting (${this.unfinished.size} hand-over(s) unfinished, kept as they are)`);
      this.lastProblem = problem;
    }
    this.timer = setTimeout(() => this.connect(), conn.fallback ? 0 : this.reconnectMs);
  }

  received(conn, msg, raw, handles) {
    if (conn.sock.destroyed || msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
      if (!conn.sock.destroyed) this.log('ignoring a line from the agent that is not a JSON object');
      for (const h of handles) fds.closeHandle(h);
      return;
    }
    if (msg.op === 'registered') {
      conn.registered = true;
      // The agent answers with the version registered; anything else is taken for 1.
      conn.version = Number.isInteger(msg.version) && msg.version >= 1 && msg.version <= conn.version ? msg.version : 1;
      conn.reader.rawBytes = conn.version >= 2;
      conn.reader.descriptors = conn.version >= 3;
      this.lastProblem = null;
      this.emit('registered', { version: conn.version, pending: this.unfinished.size });
      for (const h of handles) fds.closeHandle(h);
      return;
    }
    if (msg.op === 'error') {
      // Refused: this connection is done. An agent that does not speak the version offered
      // refuses the registration for it: register again with the one before, at once, and stay
      // with it (3, then 2, then 1).
      const text = String(msg.error);
      if (!conn.registered && conn.version > 1 && this.version === undefined && text.includes('version')) {
        learned.set(this.key, conn.version - 1);
        conn.fallback = true;
        conn.problem = `the agent does not speak hook protocol version ${conn.version} (it says: ${text}): version ${conn.version - 1} from now on`;
      } else {
        conn.problem = `the agent says: ${text}`;
      }
      for (const h of handles) fds.closeHandle(h);
      conn.sock.destroy();
      return;
    }
    this.queue = this.queue.then(() => this.serve(conn, msg, raw, handles));
  }

  unreadable(conn, line, err) {
    // A request this SDK cannot parse is refused by its id when the line starts with one: its
    // hand-over aborts now, not after its timeout. That is a version-1 import over 512 MiB
    // (longer than a JavaScript string), which version 2 carries without trouble.
    const id = /^\{"id":(\d+),/.exec(line.subarray(0, 32).toString())?.[1];
    this.log(`${id === undefined ? 'ignoring' : `refusing request ${id}:`} a line from the agent that is not JSON (${err.message}): ${line.subarray(0, 80)}`);
    if (id === undefined) return;
    const error = `unreadable request (${err.message})${conn.version === 1 ? ': version 2 of the hook protocol carries big imports' : ''}`;
    this.queue = this.queue.then(() => write(conn.sock, `${JSON.stringify({ id: Number(id), ok: false, error })}\n`));
  }

  async serve(conn, req, raw, handles) {
    const id = req.id ?? null;
    try {
      // Only commit and abort carry connections; descriptors any other line brings are closed.
      if (handles.length && (typeof req.handoff !== 'string' || (req.op !== 'commit' && req.op !== 'abort'))) {
        for (const h of handles.splice(0)) fds.closeHandle(h);
        this.log(`closed the descriptors a ${JSON.stringify(req.op)} line carried`);
      }
      if (typeof req.handoff !== 'string' && ['export', 'import', 'commit', 'abort'].includes(req.op)) {
        throw new Error(`malformed ${req.op}: no handoff`);
      }
      switch (req.op) {
        // An export or import whose connection is gone failed for the agent: not started.
        case 'export':
          if (!conn.sock.destroyed) await this.exportSessions(conn, id, req);
          return;
        case 'import':
          if (!conn.sock.destroyed) await this.importSessions(conn, id, req, raw);
          return;
        case 'commit':
        case 'abort':
          await this.end(conn, id, req, raw, handles);
          return;
        default:
          throw new Error(`unknown op ${JSON.stringify(req.op)}`);
      }
    } catch (err) {
      this.log(`answering ${req.op} ${req.handoff ?? ''} with an error: ${message(err)}`);
      await write(conn.sock, `${JSON.stringify({ id, ok: false, error: message(err) })}\n`);
    }
  }

  async exportSessions(conn, id, { handoff, clients: listed, connections: movable }) {
    if (!Array.isArray(listed)) throw new Error('malformed export: no clients');
    const clients = listed.map(normalizeClient).filter((c) => c !== null);
    // A hand-over exported again (the agent retrying it) keeps what it kept.
    const kept = this.unfinished.get(handoff)?.kept ?? [];
    this.unfinished.set(handoff, { role: 'export', clients, kept });
    let result;
    try {
      result = await this.sessions.export(handoff, [...clients]);
    } catch (err) {
      throw new Error(`the application refused the export: ${message(err)}`);
    }
    if (result == null || typeof result[Symbol.iterator] !== 'function') {
      throw new Error('the application\'s export returned no list of [client, blob] pairs');
    }
    const asked = new Set(clients);
    const given = new Set();
    const sessions = [];
    for (const [c, blob] of result) {
      const client = normalizeClient(c);
      if (!asked.has(client)) throw new Error(`the application exported ${c}, which the export did not list`);
      if (given.has(client)) throw new Error(`the application exported ${client} twice`);
      given.add(client);
      sessions.push([client, toBuffer(blob, client)]);
    }
    if (conn.version === 1) return writeExport1(conn.sock, id, sessions);
    if (conn.version === 2) return writeExport2(conn.sock, id, sessions);
    let handed = [];
    if (movable === true && this.sessions.connections) {
      // What this connection still has to write goes first, so that the descriptors leave in
      // the tick their connections are checked (lib/fds.js: writeWithDescriptors).
      await fds.flushed(conn.sock);
      handed = await this.offered(handoff, clients, kept);
    }
    return this.writeExport3(conn, id, sessions, handed, kept);
  }

  // Version 3: the connections the application offers for an export, stopped reading. Those
  // that cannot leave as they are stay with it (`kept`, given back with the outcome).
  async offered(handoff, clients, kept) {
    let list;
    try {
      list = await this.sessions.connections(handoff, [...clients]);
    } catch (err) {
      this.log(`export ${handoff}: the application's connections() failed (${message(err)}): no connection moves`);
      return [];
    }
    if (list == null) return [];
    if (typeof list[Symbol.iterator] !== 'function') {
      this.log(`export ${handoff}: the application's connections() returned no list: no connection moves`);
      return [];
    }
    const entries = [...list];
    // Reading stops before anything is decided: from here on, no byte of these connections
    // is read by this process.
    for (const e of entries) if (e?.socket instanceof net.Socket) stopReading(e.socket);
    const asked = new Set(clients);
    const seen = new Set();
    const handed = [];
    for (const e of entries) {
      const socket = e?.socket;
      if (!(socket instanceof net.Socket)) {
        this.log(`export ${handoff}: the application offered a connection without a net.Socket: ignored`);
        continue;
      }
      if (seen.has(socket)) continue;
      seen.add(socket);
      const client = normalizeClient(e.client);
      let blob;
      try {
        blob = e.blob == null ? Buffer.alloc(0) : toBuffer(e.blob, client);
      } catch (err) {
        blob = null;
      }
      const why = socket.destroyed || !socket._handle ? 'it is closed'
        : !asked.has(client) ? `its client ${JSON.stringify(e.client)} is not one the export lists`
          : blob === null ? 'its blob is not a Buffer, Uint8Array or string'
            : notMovable(socket);
      if (why === null) {
        handed.push({ client, socket, blob });
      } else if (socket.destroyed || !socket._handle) {
        this.log(`export ${handoff}: not handing over a connection of ${e.client}: ${why}`);
      } else {
        this.log(`export ${handoff}: keeping a connection of ${e.client}: ${why} (given back with the outcome)`);
        kept.push({ client: client ?? String(e.client), socket, blob: blob ?? Buffer.alloc(0) });
      }
    }
    return handed;
  }

  // Version 3: the line (with the connections' descriptors), then the sessions' blobs and the
  // connections', raw and in list order. The application's copies of descriptors that left are
  // closed once they did (no FIN: the agent holds the connections); those that did not, it
  // gets back with the outcome.
  async writeExport3(conn, id, sessions, handed, kept) {
    if (handed.length > 0 && conn.sock.writableLength > 0) {
      // (Not expected: the connection was flushed before the application was asked.)
      await fds.flushed(conn.sock);
      handed = handed.filter((c) => !c.socket.destroyed && c.socket._handle);
    }
    const bytes = sessions.reduce((n, [, b]) => n + b.length, 0) + handed.reduce((n, c) => n + c.blob.length, 0);
    const head = {
      id,
      ok: true,
      ...(bytes > 0 ? { bytes } : {}),
      ...(handed.length > 0 ? { fds: handed.length } : {}),
      sessions: sessions.map(([client, b]) => ({ client, len: b.length })),
      ...(handed.length > 0 ? { connections: handed.map((c) => ({ client: c.client, len: c.blob.length })) } : {}),
    };
    const line = Buffer.from(`${JSON.stringify(head)}\n`);
    if (handed.length === 0) {
      await write(conn.sock, line);
    } else {
      const left = await fds.writeWithDescriptors(conn.sock, line, handed.map((c) => c.socket._handle), STALL_MS);
      handed.forEach((c, i) => {
        if (left[i]) c.socket.destroy();
        else kept.push(c);
      });
      if (!left.every(Boolean)) {
        conn.problem ??= 'the answer carrying connections could not be written';
        conn.sock.destroy();
        return;
      }
    }
    await writeBlobs(conn.sock, [...sessions.map(([, b]) => b), ...handed.map((c) => c.blob)]);
  }

  async importSessions(conn, id, req, raw) {
    const sessions = conn.version >= 2 ? parseImport2(req, raw) : parseImport1(req);
    this.unfinished.set(req.handoff, { role: 'import', clients: sessions.map(([c]) => c) });
    try {
      await this.sessions.import(req.handoff, sessions);
    } catch (err) {
      throw new Error(`the application refused the import: ${message(err)}`);
    }
    await write(conn.sock, `${JSON.stringify({ id, ok: true })}\n`);
  }

  async end(conn, id, req, raw, handles) {
    const { op, handoff } = req;
    // Version 3: the connections the outcome brings (the agent's) and those the application
    // offered for this hand-over that did not leave, adopted before the outcome applies.
    const brought = conn.version >= 3 ? parseConnections(req, raw, handles) : [];
    const entry = this.unfinished.get(handoff);
    const back = [...brought, ...(entry?.kept?.splice(0) ?? [])];
    if (back.length > 0) await this.adopt(handoff, back);
    // A hand-over this application never saw is the callback's to ignore; the answer is ok.
    // A callback that fails keeps the hand-over unfinished: the agent asks again.
    try {
      await this.sessions[op](handoff);
    } catch (err) {
      throw new Error(`the application failed to apply the ${op}: ${message(err)}`);
    }
    this.unfinished.delete(handoff);
    await write(conn.sock, `${JSON.stringify({ id, ok: true })}\n`);
  }

  async adopt(handoff, connections) {
    if (!this.sessions.adopt) {
      // It takes none: closed, as its connections are in version 2.
      this.log(`${handoff}: closing ${connections.length} connection(s) the agent gave: the application adopts none (no sessions.adopt)`);
      for (const c of connections) c.socket.destroy();
      return;
    }
    try {
      await this.sessions.adopt(handoff, connections);
    } catch (err) {
      // The connections are the application's from the call on; the outcome applies anyway.
      this.log(`${handoff}: the application's adopt() failed: ${message(err)}`);
    }
  }
}

// Stops reading a connection this process is to hand over: nothing more of it is read (what
// arrives stays in the kernel, and moves with it), and no timer of its own closes it.
function stopReading(socket) {
  socket.pause();
  const h = socket._handle;
  if (h && typeof h.readStop === 'function') {
    h.reading = false;
    h.readStop();
  }
  socket.setTimeout(0);
}

// Why a connection (reading stopped) cannot leave as it is, or null: it must be an open TCP
// connection with nothing read that its owner has not consumed and nothing left to write.
function notMovable(socket) {
  if (!fds.isTcp(socket)) return 'it is not a TCP connection';
  if (socket.connecting) return 'it is not connected yet';
  if (socket.readableLength > 0) return `${socket.readableLength} bytes of it were read and not consumed`;
  if (socket._readableState?.ended || !socket.readable) return 'its client ended it';
  if (socket.writableLength > 0) return `${socket.writableLength} bytes are still to be written to it`;
  if (socket.writableEnded || !socket.writable) return 'it is being ended';
  return null;
}

// The connections a version 3 commit or abort carries: each client, a live net.Socket and its
// blob. A list that does not match what came is refused (ok:false: the agent logs it and sends
// the outcome again); its descriptors are closed.
function parseConnections(req, raw, handles) {
  try {
    const list = req.connections ?? [];
    if (!Array.isArray(list)) throw new Error('connections is not a list');
    if (list.length !== handles.length) throw new Error(`${list.length} connections came with ${handles.length} descriptors`);
    let at = 0;
    const parsed = list.map((c) => {
      const client = normalizeClient(c?.client);
      if (client === null) throw new Error(`the client ${JSON.stringify(c?.client)} of a connection is not an address`);
      const len = c.len ?? 0;
      if (!Number.isSafeInteger(len) || len < 0) throw new Error(`the connection of ${client} has no len`);
      at += len;
      return [client, at - len, at];
    });
    const data = raw ?? Buffer.alloc(0);
    if (at !== data.length || (req.bytes ?? 0) !== data.length) throw new Error(`the connections' len add up to ${at}, the line announces ${req.bytes ?? 0} bytes`);
    if (!handles.every(fds.isStream)) throw new Error('a descriptor that is not a stream socket');
    return parsed.map(([client, from, to], i) => ({ client, socket: fds.socketFor(handles[i]), blob: data.subarray(from, to) }));
  } catch (err) {
    for (const h of handles) fds.closeHandle(h);
    throw new Error(`malformed ${req.op}: ${err.message}`);
  }
}

function toBuffer(blob, client) {
  if (Buffer.isBuffer(blob)) return blob;
  if (blob instanceof Uint8Array) return Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength);
  if (typeof blob === 'string') return Buffer.from(blob);
  throw new Error(`the application exported a session of ${client} that is not a Buffer, Uint8Array or string`);
}

// Version 1: blobs in base64 inside the line, written piece by piece as they are encoded.
async function writeExport1(sock, id, sessions) {
  let piece = `{"id":${JSON.stringify(id)},"ok":true,"sessions":[`;
  for (let i = 0; i < sessions.length; i++) {
    const [client, blob] = sessions[i];
    piece += `${i ? ',' : ''}{"client":"${client}","blob":"${blob.toString('base64')}"}`;
    if (piece.length >= PIECE) {
      await write(sock, piece);
      if (sock.destroyed) return;
      piece = '';
    }
  }
  await write(sock, `${piece}]}\n`);
}

// Version 2: a header line with each blob's length, then the blobs, raw and in that order.
async function writeExport2(sock, id, sessions) {
  const bytes = sessions.reduce((n, [, b]) => n + b.length, 0);
  const head = { id, ok: true, ...(bytes > 0 ? { bytes } : {}), sessions: sessions.map(([client, b]) => ({ client, len: b.length })) };
  await write(sock, `${JSON.stringify(head)}\n`);
  await writeBlobs(sock, sessions.map(([, b]) => b));
}

// Raw blobs after a line, in pieces of about PIECE bytes.
async function writeBlobs(sock, blobs) {
  let group = [];
  let size = 0;
  for (const blob of blobs) {
    group.push(blob);
    size += blob.length;
    if (size >= PIECE) {
      await write(sock, group.length === 1 ? group[0] : Buffer.concat(group, size));
      if (sock.destroyed) return;
      [group, size] = [[], 0];
    }
  }
  if (size > 0) await write(sock, Buffer.concat(group, size));
}

function client(s) {
  const c = normalizeClient(s?.client);
  if (c === null) throw new Error(`malformed import: the client ${JSON.stringify(s?.client)} is not an address`);
  return c;
}

function parseImport1({ sessions }) {
  if (!Array.isArray(sessions)) throw new Error('malformed import: no sessions');
  return sessions.map((s) => {
    const c = client(s);
    const blob = typeof s.blob === 'string' ? Buffer.from(s.blob, 'base64') : null;
    // Node's decoder skips what is not base64: only a blob that encodes back to itself is one.
    if (blob === null || blob.toString('base64') !== s.blob) throw new Error(`malformed import: the blob of ${c} is not base64`);
    return [c, blob];
  });
}

function parseImport2({ sessions, bytes = 0 }, raw) {
  if (!Array.isArray(sessions)) throw new Error('malformed import: no sessions');
  let at = 0;
  const parsed = sessions.map((s) => {
    const c = client(s);
    if (!Number.isSafeInteger(s.len) || s.len < 0) throw new Error(`malformed import: the session of ${c} has no len`);
    at += s.len;
    return [c, at - s.len, at];
  });
  const data = raw ?? Buffer.alloc(0);
  if (at !== data.length || bytes !== data.length) throw new Error(`malformed import: the sessions' len add up to ${at}, the line announces ${bytes} bytes`);
  // Views into the bytes received, not copies.
  return parsed.map(([c, from, to]) => [c, data.subarray(from, to)]);
}

// Resolves once `data` is handed to the socket and the socket can take more (or is gone). An
// agent that takes nothing for STALL_MS is as good as gone: the connection ends (and is made
// again), rather than the requests behind this one waiting forever.
function write(sock, data) {
  if (sock.destroyed) return Promise.resolve();
  if (sock.write(data)) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => sock.destroy(new Error(`the agent read nothing for ${STALL_MS / 1000} s`)), STALL_MS);
    const done = () => {
      clearTimeout(timer);
      sock.off('drain', done);
      sock.off('close', done);
      resolve();
    };
    sock.on('drain', done);
    sock.on('close', done);
  });
}

module.exports = { attach, Hook, VERSION };
