'use strict';
// A fake agent for the tests: a Unix socket server whose connections the test drives line by
// line (what the agent sends, what the application answers). Not a test file itself.

const fs = require('fs');
const net = require('net');
const os = require('os');
const path = require('path');
const { attach } = require('..');
const { MessageReader } = require('../lib/framing');

const WAIT_MS = 5000;

// A queue whose `take` waits (up to WAIT_MS) for the next item.
class Queue {
  constructor(what) {
    this.what = what;
    this.items = [];
    this.waiters = [];
  }

  put(item) {
    const w = this.waiters.shift();
    if (w) w(item);
    else this.items.push(item);
  }

  take(ms = WAIT_MS) {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(got), 1);
        reject(new Error(`no ${this.what} within ${ms} ms`));
      }, ms);
      const got = (item) => {
        clearTimeout(timer);
        resolve(item);
      };
      this.waiters.push(got);
    });
  }
}

/** One connection from the application, seen from the agent's side. */
class Conn {
  constructor(sock) {
    this.sock = sock;
    this.messages = new Queue('line from the application');
    this.reader = new MessageReader(
      (msg, raw) => this.messages.put({ msg, raw }),
      (line) => this.messages.put({ msg: undefined, raw: null, line: line.toString() }),
    );
    sock.on('data', (d) => this.reader.push(d));
    sock.on('error', () => {});
  }

  /** Sends `msg` as a line, then `raw` (a Buffer or string), as the agent would. */
  send(msg, raw) {
    // A version-2 (or 3) registration makes the application's `bytes` frame raw bytes from
    // now on. (This agent passes no descriptors: test/fd-agent.py does.)
    if (msg.op === 'registered' && msg.version >= 2) this.reader.rawBytes = true;
    this.sock.write(`${JSON.stringify(msg)}\n`);
    if (raw !== undefined && raw !== null) this.sock.write(raw);
  }

  /** The application's next message: { msg, raw }. */
  read(ms) {
    return this.messages.take(ms);
  }

  close() {
    this.sock.destroy();
  }
}

class FakeAgent {
  /** An agent listening on a new socket. */
  static start() {
    return FakeAgent.away().listen();
  }

  /** An agent whose socket does not exist yet (`listen` makes it). */
  static away() {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'redirector-sdk-node-'));
    return new FakeAgent(path.join(dir, 'app.sock'), dir);
  }

  listen() {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.path, () => resolve(this));
    });
  }

  constructor(socketPath, dir) {
    this.path = socketPath;
    this.dir = dir;
    this.conns = new Queue('connection from the application');
    this.all = [];
    this.hooks = [];
    this.server = net.createServer((sock) => {
      const c = new Conn(sock);
      this.all.push(c);
      this.conns.put(c);
    });
  }

  /** The next connection the application makes. */
  accept(ms) {
    return this.conns.take(ms);
  }

  /** Attaches the SDK to this agent (reconnecting quickly, quiet); `stop` closes it. */
  attach(options) {
    const hook = attach({ socket: this.path, reconnectMs: 20, log: null, ...options });
    this.hooks.push(hook);
    return hook;
  }

  /** Closes every hook attached through `attach`, then the agent. */
  async stop() {
    await Promise.all(this.hooks.map((h) => h.close()));
    for (const c of this.all) c.close();
    return new Promise((resolve) => {
      const gone = () => {
        fs.rmSync(this.dir, { recursive: true, force: true });
        resolve();
      };
      if (this.server.listening) this.server.close(gone);
      else gone();
    });
  }
}

module.exports = { FakeAgent };
