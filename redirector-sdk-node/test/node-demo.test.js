'use strict';
// The Node.js demo (examples/node-demo/server.js) in version 3 against test/fd-agent.py: its
// idle keep-alive connections move out with their sessions and come back, live; a connection
// whose next request the server began to read stays; a connection whose request waits on the
// frozen session moves with that request (its blob), which is answered once, where it goes.

const assert = require('assert/strict');
const net = require('net');
const path = require('path');
const { spawn } = require('child_process');
const { test } = require('node:test');
const { once } = require('events');
const { setTimeout: sleep } = require('timers/promises');
const { FdAgent, unavailable } = require('./fd-agent');

const DEMO = path.join(__dirname, '../../examples/node-demo/server.js');
const SERVICE = '198.18.0.10:80';

// Waits until `cond()` holds (polled), at most `ms`; `what` says what for, when it does not.
async function until(cond, what, ms = 5000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`waited ${ms} ms for ${what()}`);
    await sleep(10);
  }
}

// A demo on a free port, registered (version 3) with `agent` (as its application `app`, when
// given): { proc, port, log }. `node`: options for node itself.
async function startDemo(agent, name, { app, args = [], node = [] } = {}) {
  const port = await freePort();
  const proc = spawn(process.execPath, [...node, DEMO, '--name', name, '--listen', `127.0.0.1:${port}`, '--hook', agent.path, '--service', SERVICE, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  const demo = { proc, port, log: '' };
  proc.stderr.on('data', (d) => (demo.log += d));
  await agent.call('accept', app === undefined ? {} : { app });
  assert.deepEqual((await agent.read(app)).msg, { op: 'register', service: SERVICE, version: 3, pending: [] });
  await agent.send({ op: 'registered', service: SERVICE, version: 3 }, { app });
  await until(() => demo.log.includes('listening on'), () => `demo ${name} to listen: ${demo.log}`);
  return demo;
}

async function stopDemo(demo) {
  if (!demo) return;
  if (demo.proc.exitCode === null && demo.proc.signalCode === null) {
    const exited = once(demo.proc, 'exit');
    demo.proc.kill();
    await exited;
  }
}

// How many requests of 127.0.0.1 began to wait on a frozen session, says the demo's log.
function waiting(demo) {
  return demo.log.split('a request of 127.0.0.1 waits').length - 1;
}

async function freePort() {
  const s = net.createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const { port } = s.address();
  s.close();
  return port;
}

// A raw HTTP/1.1 client connection that reads whole responses (Content-Length bodies).
class Client {
  static async open(port) {
    const c = new Client(net.connect(port, '127.0.0.1'));
    await once(c.sock, 'connect');
    return c;
  }

  constructor(sock) {
    this.sock = sock;
    this.buf = '';
    this.events = [];
    this.wake = null;
    sock.on('data', (d) => {
      this.buf += d;
      this.wake?.();
    });
    sock.on('end', () => {
      this.events.push('end');
      this.wake?.();
    });
    sock.on('close', () => this.events.push('close'));
  }

  get port() {
    return this.sock.localPort;
  }

  send(text) {
    this.sock.write(text);
  }

  get(extra = '') {
    this.send(`GET / HTTP/1.1\r\nHost: demo\r\n\r\n${extra}`);
  }

  // The next response: { status, body } (body parsed as JSON when it is), or null if none
  // came within `ms`.
  async response(ms = 5000) {
    const until = Date.now() + ms;
    for (;;) {
      const head = this.buf.indexOf('\r\n\r\n');
      if (head >= 0) {
        const len = Number(/content-length: *(\d+)/i.exec(this.buf.slice(0, head))?.[1] ?? 0);
        if (this.buf.length >= head + 4 + len) {
          const status = Number(this.buf.slice(9, 12));
          const body = this.buf.slice(head + 4, head + 4 + len);
          this.buf = this.buf.slice(head + 4 + len);
          try {
            return { status, body: JSON.parse(body) };
          } catch {
            return { status, body };
          }
        }
      }
      const left = until - Date.now();
      if (left <= 0 || this.events.includes('end')) return null;
      await new Promise((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = null;
    }
  }
}

test('the Node demo hands idle connections over with their sessions and takes them back, live', { skip: unavailable() ?? false }, async () => {
  const agent = await FdAgent.start();
  const port = await freePort();
  const demo = spawn(process.execPath, [DEMO, '--name', 'A', '--listen', `127.0.0.1:${port}`, '--hook', agent.path, '--service', SERVICE], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  demo.stderr.on('data', (d) => (log += d));
  const clients = [];
  try {
    await agent.call('accept');
    assert.deepEqual((await agent.read()).msg, { op: 'register', service: SERVICE, version: 3, pending: [] });
    await agent.send({ op: 'registered', service: SERVICE, version: 3 });
    while (!log.includes('listening on')) await sleep(10);

    // One idle keep-alive connection, and one whose next request the server began to read
    // (it came in the same packet as the end of the one before).
    const idle = await Client.open(port);
    const reading = await Client.open(port);
    clients.push(idle, reading);
    idle.get();
    assert.equal((await idle.response()).body.count, 1);
    reading.get('GET / HT');
    assert.equal((await reading.response()).body.count, 2);

    await agent.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['127.0.0.1'], connections: true });
    const out = await agent.read();
    const blob = JSON.stringify({ count: 2, history: [1, 2] });
    assert.deepEqual(out.msg, { id: 1, ok: true, bytes: blob.length, fds: 1, sessions: [{ client: '127.0.0.1', len: blob.length }], connections: [{ client: '127.0.0.1', len: 0 }] }, log);
    assert.equal(out.raw, blob);
    assert.equal((await agent.call('name', { fd: out.fds[0] })).peer[1], idle.port, 'the idle connection moved, the other stayed');

    // While the agent holds it, the demo reads nothing of it; the client sees no end.
    idle.get();
    assert.equal(await idle.response(200), null);
    // The hand-over fails: the connection comes back, and its waiting request is served on it.
    await agent.send({ id: 2, op: 'abort', handoff: 'a/1/b', fds: 1, connections: [{ client: '127.0.0.1', len: 0 }] }, { fds: out.fds });
    assert.deepEqual((await agent.read()).msg, { id: 2, ok: true });
    await agent.call('close', { fd: out.fds[0] });
    assert.equal((await idle.response()).body.count, 3, 'served on the same connection, from the unchanged session');
    reading.send('TP/1.1\r\nHost: demo\r\n\r\n');
    assert.equal((await reading.response()).body.count, 4);

    // Both idle now: both move; the commit drops the session; the connections are the agent's
    // (here: it answers on one itself), the demo closes nothing.
    await agent.send({ id: 3, op: 'export', handoff: 'a/3/b', clients: ['127.0.0.1'], connections: true });
    const again = await agent.read();
    assert.equal(again.msg.fds, 2);
    const peers = [];
    for (const fd of again.fds) peers.push((await agent.call('name', { fd })).peer[1]);
    assert.deepEqual([...peers].sort(), [idle.port, reading.port].sort());
    await agent.send({ id: 4, op: 'commit', handoff: 'a/3/b' });
    assert.deepEqual((await agent.read()).msg, { id: 4, ok: true });
    const mine = again.fds[peers.indexOf(idle.port)];
    await agent.call('write', { fd: mine, data: 'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"elsewhere"' });
    assert.deepEqual(await idle.response(), { status: 200, body: 'elsewhere' });
    assert.deepEqual(idle.events, [], 'no end from the demo');
    assert.deepEqual(reading.events, []);

    // The session moved: a new connection starts a new one.
    const fresh = await Client.open(port);
    clients.push(fresh);
    fresh.get();
    assert.equal((await fresh.response()).body.count, 1);
    assert.match(log, /handing over 1 connections \(1 idle, 0 with a request waiting; 1 busy ones stay\)/);
    assert.match(log, /a\/1\/b: adopted 1 connections/);
  } finally {
    for (const c of clients) c.sock.destroy();
    demo.kill();
    await once(demo, 'exit');
    await agent.stop();
  }
});

test('the Node demo hands a connection over with the request waiting on the frozen session, answered once when it comes back (abort)', { skip: unavailable() ?? false }, async () => {
  const agent = await FdAgent.start();
  let demo;
  const clients = [];
  try {
    // The frozen wait bounded at 2 s: the demo that let go of a request never answers it (503).
    demo = await startDemo(agent, 'A', { args: ['--freeze-wait-ms', '2000'] });
    const get = await Client.open(demo.port);
    const post = await Client.open(demo.port);
    const piped = await Client.open(demo.port);
    clients.push(get, post, piped);
    get.get();
    assert.equal((await get.response()).body.count, 1);

    // The client is frozen by a hand-over (its export asked for no connection); meanwhile three
    // requests come and wait on its session: a GET, a POST with a chunked body and a trailer,
    // and a GET the start of the next request came right after (that connection stays: the
    // server read some of it).
    await agent.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['127.0.0.1'] });
    const session = JSON.stringify({ count: 1, history: [1] });
    const first = await agent.read();
    assert.deepEqual(first.msg, { id: 1, ok: true, bytes: session.length, sessions: [{ client: '127.0.0.1', len: session.length }] });
    const getText = 'GET /x?y=1 HTTP/1.1\r\nHost: demo\r\nX-Mixed-Case: a, b\r\n\r\n';
    get.send(getText);
    post.send('POST /p HTTP/1.1\r\nHost: demo\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\nX-Trailer: t\r\n\r\n');
    piped.get('GET / HT');
    await until(() => waiting(demo) >= 3, () => `three requests to wait: ${demo.log}`);

    // The agent asks again, for connections this time: both go, each with its request as its
    // blob (the chunked body as one chunk).
    await agent.send({ id: 2, op: 'export', handoff: 'a/1/b', clients: ['127.0.0.1'], connections: true });
    const out = await agent.read();
    assert.equal(out.msg.fds, 2, demo.log);
    assert.deepEqual(out.msg.sessions, [{ client: '127.0.0.1', len: session.length }]);
    const expected = new Map([
      [get.port, getText],
      [post.port, 'POST /p HTTP/1.1\r\nHost: demo\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n'],
    ]);
    const blobs = [];
    for (let i = 0; i < 2; i++) blobs.push(expected.get((await agent.call('name', { fd: out.fds[i] })).peer[1]));
    assert.deepEqual(out.msg.connections, blobs.map((b) => ({ client: '127.0.0.1', len: b.length })));
    assert.equal(out.msg.bytes, session.length + blobs.join('').length);
    assert.equal(out.raw, session + blobs.join(''));

    // The demo let go of them: no answer, even past --freeze-wait-ms, and no end; the request
    // that stayed gets its 503 then.
    const [late, , stayed] = await Promise.all([get.response(2300), post.response(0), piped.response(2300)]);
    assert.equal(late, null);
    assert.equal(stayed?.status, 503, demo.log);
    assert.deepEqual([get.buf, post.buf, get.events, post.events], ['', '', [], []]);

    // The hand-over fails: the connections come back with their blobs, and each request is
    // answered on its connection, once, from the unchanged session.
    await agent.send({ id: 3, op: 'abort', handoff: 'a/1/b', bytes: blobs.join('').length, fds: 2, connections: out.msg.connections }, { raw: blobs.join(''), fds: out.fds });
    assert.deepEqual((await agent.read()).msg, { id: 3, ok: true });
    for (const fd of out.fds) await agent.call('close', { fd });
    const answers = await Promise.all([get.response(), post.response()]);
    assert.deepEqual(answers.map((a) => [a?.status, a?.body.server]), [[200, 'A'], [200, 'A']], demo.log);
    assert.deepEqual(answers.map((a) => a.body.count).sort(), [2, 3]);
    assert.deepEqual(await Promise.all([get.response(300), post.response(0), piped.response(0)]), [null, null, null], 'answered once');
    assert.deepEqual([get.buf, post.buf, piped.buf], ['', '', '']);
    // The connections serve on, the session with them (the one that stayed too: nothing of
    // its next request was lost).
    get.get();
    assert.equal((await get.response()).body.count, 4);
    piped.send('TP/1.1\r\nHost: demo\r\n\r\n');
    assert.equal((await piped.response()).body.count, 5);
    assert.deepEqual([get.events, post.events, piped.events], [[], [], []]);
    assert.match(demo.log, /handing over 2 connections \(0 idle, 2 with a request waiting; 1 busy ones stay\)/);
    assert.match(demo.log, /a\/1\/b: adopted 2 connections/);
    assert.equal(demo.log.split('answering 503').length - 1, 1, 'only the request that stayed');
    assert.doesNotMatch(demo.log, /closing a connection/);
  } finally {
    for (const c of clients) c.sock.destroy();
    await stopDemo(demo);
    await agent.stop();
  }
});

test('the Node demo hands a connection over with the request waiting on the frozen session, answered by the server it moves to (commit)', { skip: unavailable() ?? false }, async () => {
  const agent = await FdAgent.start();
  let [a, b] = [null, null];
  const clients = [];
  try {
    a = await startDemo(agent, 'A', { app: 'A' });
    b = await startDemo(agent, 'B', { app: 'B' });
    const c = await Client.open(a.port);
    clients.push(c);
    c.get();
    assert.deepEqual((await c.response()).body, { server: 'A', client: '127.0.0.1', count: 1, history: [1] });

    // Frozen on A; a request waits; the agent asks again, for connections: it goes with it.
    await agent.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['127.0.0.1'] }, { app: 'A' });
    const session = JSON.stringify({ count: 1, history: [1] });
    assert.equal((await agent.read('A')).raw, session);
    c.get();
    await until(() => waiting(a) >= 1, () => `the request to wait: ${a.log}`);
    await agent.send({ id: 2, op: 'export', handoff: 'a/1/b', clients: ['127.0.0.1'], connections: true }, { app: 'A' });
    const out = await agent.read('A');
    const request = 'GET / HTTP/1.1\r\nHost: demo\r\n\r\n';
    assert.deepEqual(out.msg, { id: 2, ok: true, bytes: session.length + request.length, fds: 1, sessions: [{ client: '127.0.0.1', len: session.length }], connections: [{ client: '127.0.0.1', len: request.length }] }, a.log);
    assert.equal(out.raw, session + request);
    assert.equal((await agent.call('name', { fd: out.fds[0] })).peer[1], c.port);

    // B imports the session; the commit brings it the connection and its request, which B
    // answers from the imported session; A lets go of the client.
    await agent.send({ id: 1, op: 'import', handoff: 'a/1/b', bytes: session.length, sessions: [{ client: '127.0.0.1', len: session.length }] }, { raw: session, app: 'B' });
    assert.deepEqual((await agent.read('B')).msg, { id: 1, ok: true });
    await agent.send({ id: 2, op: 'commit', handoff: 'a/1/b', bytes: request.length, fds: 1, connections: [{ client: '127.0.0.1', len: request.length }] }, { raw: request, fds: out.fds, app: 'B' });
    assert.deepEqual((await agent.read('B')).msg, { id: 2, ok: true });
    await agent.call('close', { fd: out.fds[0] });
    await agent.send({ id: 3, op: 'commit', handoff: 'a/1/b' }, { app: 'A' });
    assert.deepEqual((await agent.read('A')).msg, { id: 3, ok: true });

    assert.deepEqual(await c.response(), { status: 200, body: { server: 'B', client: '127.0.0.1', count: 2, history: [1, 2] } }, `${a.log}\n${b.log}`);
    assert.equal(await c.response(300), null, 'answered once');
    assert.equal(c.buf, '');
    // The connection is B's now, the session with it.
    c.get();
    assert.deepEqual((await c.response()).body, { server: 'B', client: '127.0.0.1', count: 3, history: [1, 2, 3] });
    assert.deepEqual(c.events, []);
    assert.match(a.log, /handing over 1 connections \(0 idle, 1 with a request waiting; 0 busy ones stay\)/);
    assert.match(b.log, /a\/1\/b: adopted 1 connections/);
    assert.doesNotMatch(a.log, /answering 503|closing a connection/);
  } finally {
    for (const c of clients) c.sock.destroy();
    await stopDemo(a);
    await stopDemo(b);
    await agent.stop();
  }
});

test('the Node demo keeps a connection with its waiting request when the hook cannot pass it, and answers it once after the outcome', { skip: unavailable() ?? false }, async () => {
  const agent = await FdAgent.start();
  let demo;
  const clients = [];
  try {
    demo = await startDemo(agent, 'A', { node: ['-r', path.join(__dirname, 'fd-unpassable.js')] });
    const c = await Client.open(demo.port);
    clients.push(c);
    c.get();
    assert.equal((await c.response()).body.count, 1);
    await agent.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['127.0.0.1'] });
    await agent.read();
    c.get();
    await until(() => waiting(demo) >= 1, () => `the request to wait: ${demo.log}`);

    // Offered, but the answer carrying it cannot be written: the hook connection breaks.
    await agent.send({ id: 2, op: 'export', handoff: 'a/1/b', clients: ['127.0.0.1'], connections: true });
    assert.deepEqual(await agent.read(), { ok: true, eof: true });
    assert.match(demo.log, /handing over 1 connections \(0 idle, 1 with a request waiting; 0 busy ones stay\)/);

    // The demo registers again with the hand-over pending; the abort gives the connection back:
    // its request waits again, then is answered on it, once, from the unchanged session.
    await agent.call('accept');
    assert.deepEqual((await agent.read()).msg, { op: 'register', service: SERVICE, version: 3, pending: [{ handoff: 'a/1/b', role: 'export', clients: ['127.0.0.1'] }] });
    await agent.send({ op: 'registered', service: SERVICE, version: 3 });
    await agent.send({ id: 1, op: 'abort', handoff: 'a/1/b' });
    assert.deepEqual((await agent.read()).msg, { id: 1, ok: true });
    assert.deepEqual(await c.response(), { status: 200, body: { server: 'A', client: '127.0.0.1', count: 2, history: [1, 2] } }, demo.log);
    assert.equal(await c.response(300), null, 'answered once');
    c.get();
    assert.equal((await c.response()).body.count, 3);
    assert.deepEqual(c.events, []);
    assert.match(demo.log, /a\/1\/b: adopted 0 connections, 1 kept/);
  } finally {
    for (const c of clients) c.sock.destroy();
    await stopDemo(demo);
    await agent.stop();
  }
});

// The agent lists the clients to move by the connections the kernel counts, and steers their new
// connections elsewhere before the commit: a connection of such a client still waiting in the
// listener's queue when the commit comes is one of its open connections here (closed, as the
// commit says), not the client coming back (which a connection made after the commit is, once
// the rules are withdrawn: its volunteer lost, say). A loaded demo once took such a connection
// after applying the commit and served the moved client from a new session here for the rest
// of the run (the sessions test, 2 runs in 7). Node accepts one waiting connection per turn of
// its event loop: five wait here. The demo is stopped while the commit reaches it and the
// clients connect, so all wait for it: the commit first.
test('the Node demo closes a moved client\'s connections that waited in the listener\'s queue across the commit', { skip: unavailable() ?? false }, async () => {
  const agent = await FdAgent.start();
  let demo;
  const clients = [];
  try {
    demo = await startDemo(agent, 'A');
    // The client has no connection here yet (the kernel has them, in the listener's queue).
    await agent.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['127.0.0.1'] });
    assert.deepEqual((await agent.read()).msg, { id: 1, ok: true, sessions: [] });
    demo.proc.kill('SIGSTOP');
    try {
      await agent.send({ id: 2, op: 'commit', handoff: 'a/1/b' });
      for (let i = 0; i < 5; i += 1) {
        const queued = await Client.open(demo.port);
        clients.push(queued);
        queued.get();
      }
    } finally {
      demo.proc.kill('SIGCONT');
    }
    assert.deepEqual((await agent.read()).msg, { id: 2, ok: true });
    const answers = await Promise.all(clients.map((c) => c.response()));
    assert.deepEqual(answers, [null, null, null, null, null], `no answer: the session lives elsewhere (${demo.log})`);
    assert.ok(clients.every((c) => c.events.includes('end')), 'the demo closed the connections');
    assert.equal(demo.log.split('closing a connection of 127.0.0.1: its session moved').length - 1, 5, demo.log);

    // A connection made after the commit reached this server: the client is back (here without
    // its session, as when its volunteer was lost), served from a new one.
    const back = await Client.open(demo.port);
    clients.push(back);
    back.get();
    assert.deepEqual((await back.response()).body, { server: 'A', client: '127.0.0.1', count: 1, history: [1] });
  } finally {
    for (const c of clients) c.sock.destroy();
    await stopDemo(demo);
    await agent.stop();
  }
});
