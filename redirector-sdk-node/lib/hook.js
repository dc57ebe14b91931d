'use strict';
// The connection to the agent's hook socket: register, answer export/import/commit/abort
// through the application's callbacks, reconnect, report unfinished hand-overs.

const { EventEmitter } = require('events');
const net = require('net');
const path = require('path');
const { MessageReader } = require('./framing');
const { normalizeClient } = require('./client');

/** The newest hook protocol version this package speaks (it speaks 1 too). */
const VERSION = 2;
const RECONNECT_MS = 500;
// A big export answer leaves in pieces of about this size, the first as soon as it is ready.
const PIECE = 1 << 20;
const STALL_MS = 60_000;

// The version that worked for each socket path, once an agent refused version 2 there: it
// is not asked again until the process ends (docs: negotiation).
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
    if (version !== undefined && version !== 1 && version !== 2) throw new TypeError(`attach: \`version\` is 1 or 2, not ${version}`);
    this.path = socket;
    this.key = path.resolve(socket);
    this.service = service;
    this.sessions = sessions;
    this.version = version;
    this.reconnectMs = reconnectMs;
    this.log = log || (() => {});
    // Hand-overs this application took part in and has not seen end, by name: { role, clients }.
    // They outlive a connection: reported when registering again.
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
    const version = this.version ?? learned.get(this.key) ?? VERSION;
    const sock = net.connect(this.path);
    const conn = { sock, version, registered: false, problem: null, fallback: false };
    conn.reader = new MessageReader(
      (msg, raw) => this.received(conn, msg, raw),
      (line, err) => this.unreadable(conn, line, err),
    );
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
    sock.on('close', () => this.lost(conn));
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

  received(conn, msg, raw) {
    if (conn.sock.destroyed) return;
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
      this.log('ignoring a line from the agent that is not a JSON object');
      return;
    }
    if (msg.op === 'registered') {
      conn.registered = true;
      conn.version = conn.version === 2 && msg.version === 2 ? 2 : 1;
      conn.reader.rawBytes = conn.version === 2;
      this.lastProblem = null;
      this.emit('registered', { version: conn.version, pending: this.unfinished.size });
      return;
    }
    if (msg.op === 'error') {
      // Refused: this connection is done. An agent that speaks only version 1
      // refuses a version-2 registration: register again with 1, at once, and stay with it.
      const text = String(msg.error);
      if (!conn.registered && conn.version === 2 && this.version === undefined && text.includes('version')) {
        learned.set(this.key, 1);
        conn.fallback = true;
        conn.problem = `the agent speaks an older hook protocol (it says: ${text}): version 1 from now on`;
      } else {
        conn.problem = `the agent says: ${text}`;
      }
      conn.sock.destroy();
      return;
    }
    this.queue = this.queue.then(() => this.serve(conn, msg, raw));
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

  async serve(conn, req, raw) {
    const id = req.id ?? null;
    try {
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
          await this.end(conn, id, req.op, req.handoff);
          return;
        default:
          throw new Error(`unknown op ${JSON.stringify(req.op)}`);
      }
    } catch (err) {
      this.log(`answering ${req.op} ${req.handoff ?? ''} with an error: ${message(err)}`);
      await write(conn.sock, `${JSON.stringify({ id, ok: false, error: message(err) })}\n`);
    }
  }

  async exportSessions(conn, id, { handoff, clients: listed }) {
    if (!Array.isArray(listed)) throw new Error('malformed export: no clients');
    const clients = listed.map(normalizeClient).filter((c) => c !== null);
    this.unfinished.set(handoff, { role: 'export', clients });
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
    await (conn.version === 2 ? writeExport2 : writeExport1)(conn.sock, id, sessions);
  }

  async importSessions(conn, id, req, raw) {
    const sessions = conn.version === 2 ? parseImport2(req, raw) : parseImport1(req);
    this.unfinished.set(req.handoff, { role: 'import', clients: sessions.map(([c]) => c) });
    try {
      await this.sessions.import(req.handoff, sessions);
    } catch (err) {
      throw new Error(`the application refused the import: ${message(err)}`);
    }
    await write(conn.sock, `${JSON.stringify({ id, ok: true })}\n`);
  }

  async end(conn, id, op, handoff) {
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
  let group = [];
  let size = 0;
  for (const [, blob] of sessions) {
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
