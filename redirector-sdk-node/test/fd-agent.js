'use strict';
// Drives test/fd-agent.py, a fake agent that passes descriptors (SCM_RIGHTS) as the real one
// does in version 3, from the tests. Not a test file itself.

const { spawn, spawnSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');
const readline = require('readline');

/** Why the descriptor tests cannot run here (no Python 3), or null. */
function unavailable() {
  const r = spawnSync('python3', ['-c', 'import socket, array; socket.CMSG_SPACE'], { encoding: 'utf8' });
  if (r.error) return `python3 is not installed (${r.error.code}): the fake agent that passes descriptors is a Python script`;
  if (r.status !== 0) return `python3 cannot pass descriptors: ${r.stderr.trim()}`;
  return null;
}

class FdAgent {
  /** A fake agent listening on a new socket. */
  static async start() {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'redirector-sdk-node-fds-'));
    const agent = new FdAgent(path.join(dir, 'app.sock'), dir);
    const first = await agent.reply();
    if (!first.listening) throw new Error(`fd-agent.py did not start: ${JSON.stringify(first)}`);
    return agent;
  }

  constructor(socketPath, dir) {
    this.path = socketPath;
    this.dir = dir;
    this.stderr = '';
    this.proc = spawn('python3', [path.join(__dirname, 'fd-agent.py'), socketPath], { stdio: ['pipe', 'pipe', 'pipe'] });
    this.proc.stderr.on('data', (d) => (this.stderr += d));
    this.replies = [];
    this.waiters = [];
    this.exited = false;
    readline.createInterface({ input: this.proc.stdout }).on('line', (l) => {
      const w = this.waiters.shift();
      if (w) w(JSON.parse(l));
      else this.replies.push(JSON.parse(l));
    });
    this.proc.on('exit', () => {
      this.exited = true;
      for (const w of this.waiters.splice(0)) w({ error: `fd-agent.py exited: ${this.stderr}` });
    });
  }

  reply() {
    if (this.replies.length) return Promise.resolve(this.replies.shift());
    if (this.exited) return Promise.resolve({ error: `fd-agent.py exited: ${this.stderr}` });
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Runs one command (see fd-agent.py); rejects with the agent's error. */
  async call(cmd, args = {}) {
    this.proc.stdin.write(`${JSON.stringify({ cmd, ...args })}\n`);
    const r = await this.reply();
    if (r.error) throw new Error(`fd-agent.py ${cmd}: ${r.error}`);
    return r;
  }

  /** The application's next message: { msg, raw, fds } (or { eof: true }); `app`: of the one accepted under that name. */
  read(app) {
    return this.call('read', app === undefined ? {} : { app });
  }

  /**
   * Sends `msg` with the held sockets `fds` attached (one per sendmsg), then `raw`; `app`: to
   * the one accepted under that name.
   */
  send(msg, { raw, fds = [], perSend = 1, app } = {}) {
    return this.call('send', { msg, raw, fds, per_send: perSend, ...(app === undefined ? {} : { app }) });
  }

  async stop() {
    this.proc.stdin.end();
    if (!this.exited) await new Promise((resolve) => this.proc.on('exit', resolve));
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

module.exports = { FdAgent, unavailable };
