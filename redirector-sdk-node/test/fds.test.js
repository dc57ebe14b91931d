'use strict';
// Version 3: open TCP connections passed both ways with SCM_RIGHTS, against test/fd-agent.py (a
// fake agent in Python, which can pass descriptors). Real loopback TCP connections: what one
// end writes, the other end reads, whichever process holds the descriptor.

const assert = require('assert/strict');
const net = require('net');
const { spawnSync } = require('child_process');
const { test } = require('node:test');
const { once } = require('events');
const { setTimeout: sleep } = require('timers/promises');
const { attach } = require('..');
const { recordingApp } = require('./recording-app');
const { FdAgent, unavailable } = require('./fd-agent');

const SERVICE = '198.18.0.10:80';
const skip = unavailable() ?? false;

// Loopback TCP connections made in this process: [client end, server end] pairs.
async function tcpPairs(n) {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const pairs = [];
  for (let i = 0; i < n; i++) {
    const accepted = once(server, 'connection');
    const client = net.connect(server.address().port, '127.0.0.1');
    const [serverEnd] = await accepted;
    if (client.connecting) await once(client, 'connect');
    pairs.push([client, serverEnd]);
  }
  server.close();
  return pairs;
}

// Reads exactly `n` bytes of `socket` (as text).
function readN(socket, n, ms = 5000) {
  return new Promise((resolve, reject) => {
    let got = '';
    const timer = setTimeout(() => done(new Error(`read ${JSON.stringify(got)} of ${n} bytes within ${ms} ms`)), ms);
    const onData = (d) => {
      got += d;
      if (got.length >= n) done(null);
    };
    const onEnd = () => done(new Error(`the connection ended after ${JSON.stringify(got)}`));
    function done(err) {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('end', onEnd);
      if (err) reject(err);
      else resolve(got);
    }
    socket.on('data', onData);
    socket.on('end', onEnd);
  });
}

// The tests' recording application, with the version 3 callbacks logged too.
function app(over = {}) {
  const a = recordingApp();
  return Object.assign(
    a,
    {
      connections: (h, clients) => (a.calls.push(['connections', h, clients]), []),
      adopt: (h, conns) => void a.calls.push(['adopt', h, conns.map((c) => [c.client, c.blob.toString()])]),
    },
    over,
  );
}

// An agent, the SDK attached to it and registered with version 3.
async function withAgent(sessions, f) {
  const agent = await FdAgent.start();
  const log = [];
  const hook = attach({ socket: agent.path, service: SERVICE, sessions, reconnectMs: 20, log: (m) => log.push(m) });
  try {
    await agent.call('accept');
    const { msg } = await agent.read();
    assert.deepEqual(msg, { op: 'register', service: SERVICE, version: 3, pending: [] });
    await agent.send({ op: 'registered', service: SERVICE, version: 3 });
    await f(agent, hook, log);
  } finally {
    await hook.close();
    await agent.stop();
  }
}

test('an export with connections:true hands over a live loopback TCP connection; an abort gives it back to adopt()', { skip }, async () => {
  const [[client, appEnd]] = await tcpPairs(1);
  const clientEvents = [];
  client.on('end', () => clientEvents.push('end'));
  client.on('close', () => clientEvents.push('close'));
  let adopted = null;
  const sessions = app({
    export: (h, clients) => (sessions.calls.push(['export', h, clients]), [['127.0.0.1', 'sess']]),
    connections: (h, clients) => (sessions.calls.push(['connections', h, clients]), [{ client: '::ffff:127.0.0.1', socket: appEnd, blob: 'conn-state' }]),
    adopt(h, conns) {
      sessions.calls.push(['adopt', h, conns.map((c) => [c.client, c.blob.toString()])]);
      adopted = conns[0].socket;
      adopted.on('data', (d) => adopted.write(`echo ${d}`));
    },
  });
  await withAgent(sessions, async (agent) => {
    await agent.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['127.0.0.1'], connections: true });
    const { msg, raw, fds } = await agent.read();
    assert.deepEqual(msg, { id: 1, ok: true, bytes: 14, fds: 1, sessions: [{ client: '127.0.0.1', len: 4 }], connections: [{ client: '127.0.0.1', len: 10 }] });
    assert.equal(raw, 'sessconn-state', 'the sessions\' blobs, then the connections\'');
    assert.equal(fds.length, 1);
    // The very connection: its peer is the client end.
    const { peer } = await agent.call('name', { fd: fds[0] });
    assert.deepEqual(peer, ['127.0.0.1', client.localPort]);
    assert.equal(appEnd.destroyed, true, 'the application\'s copy is closed once it left');
    // Both ways through the descriptor the agent holds.
    const reading = readN(client, 14);
    await agent.call('write', { fd: fds[0], data: 'from the agent' });
    assert.equal(await reading, 'from the agent');
    client.write('to the agent');
    assert.deepEqual(await agent.call('recv', { fd: fds[0], n: 12 }), { ok: true, data: 'to the agent', eof: false });
    assert.deepEqual(clientEvents, [], 'closing the application\'s copy sent nothing to the client');

    // The hand-over fails: the agent gives the connection back, with its blob.
    await agent.send({ id: 2, op: 'abort', handoff: 'a/1/b', bytes: 10, fds: 1, connections: [{ client: '127.0.0.1', len: 10 }] }, { raw: 'conn-state', fds });
    assert.deepEqual((await agent.read()).msg, { id: 2, ok: true });
    await agent.call('close', { fd: fds[0] });
    assert.deepEqual(sessions.calls, [
      ['export', 'a/1/b', ['127.0.0.1']],
      ['connections', 'a/1/b', ['127.0.0.1']],
      ['adopt', 'a/1/b', [['127.0.0.1', 'conn-state']]],
      ['abort', 'a/1/b'],
    ]);
    assert.ok(adopted instanceof net.Socket);
    assert.equal(adopted.remotePort, client.localPort, 'the same connection, back');
    const echoed = readN(client, 9);
    client.write('ping');
    assert.equal(await echoed, 'echo ping', 'the adopted socket serves the client (the agent closed its copy)');
    assert.deepEqual(clientEvents, []);
  });
  client.destroy();
  adopted?.destroy();
});

for (const n of [3, 100]) {
  test(`${n} descriptors on one line arrive in order, both ways`, { skip }, async () => {
    const pairs = await tcpPairs(n);
    const clients = pairs.map((_, i) => `198.18.${1 + (i >> 8)}.${i & 255}`);
    let adopted = null;
    const sessions = app({
      connections: () => pairs.map(([, appEnd], i) => ({ client: clients[i], socket: appEnd, blob: `b${i};` })),
      adopt(h, conns) {
        adopted = conns;
      },
    });
    await withAgent(sessions, async (agent) => {
      // Out, from the application: N pieces, one descriptor each.
      await agent.send({ id: 1, op: 'export', handoff: 'a/1/b', clients, connections: true });
      const { msg, raw, fds } = await agent.read();
      assert.deepEqual(msg.connections, clients.map((client, i) => ({ client, len: `b${i};`.length })));
      assert.equal(msg.fds, n);
      assert.equal(raw, clients.map((_, i) => `b${i};`).join(''));
      assert.equal(fds.length, n);
      for (let i = 0; i < n; i++) {
        const { peer } = await agent.call('name', { fd: fds[i] });
        assert.equal(peer[1], pairs[i][0].localPort, `descriptor ${i} is connection ${i}`);
      }
      // In, from the agent: one line carrying N of its own loopback connections, one
      // descriptor per sendmsg (more than libuv takes from one message).
      const made = [];
      for (let i = 0; i < n; i++) made.push(await agent.call('pair'));
      const blobs = made.map((_, i) => 'x'.repeat(i % 4));
      await agent.send({ id: 2, op: 'commit', handoff: 'c/2/a', bytes: blobs.join('').length, fds: n, connections: clients.map((client, i) => ({ client, len: blobs[i].length })) }, { raw: blobs.join(''), fds: made.map((m) => m.server) });
      assert.deepEqual((await agent.read()).msg, { id: 2, ok: true });
      assert.equal(adopted.length, n);
      assert.deepEqual(adopted.map((c) => [c.client, c.blob.toString()]), clients.map((c, i) => [c, blobs[i]]));
      for (let i = 0; i < n; i++) await agent.call('close', { fd: made[i].server });
      // Each adopted socket is the connection listed at its place: what the client end of
      // connection i writes, socket i reads.
      for (let i = 0; i < n; i++) await agent.call('write', { fd: made[i].client, data: `tag${i}.` });
      const got = await Promise.all(adopted.map((c, i) => readN(c.socket, `tag${i}.`.length)));
      assert.deepEqual(got, adopted.map((_, i) => `tag${i}.`));
    });
    for (const [client] of pairs) client.destroy();
    for (const c of adopted ?? []) c.socket.destroy();
  });
}

test('an answer carrying descriptors leaves after the bytes written before it', { skip }, async () => {
  const [[client, appEnd]] = await tcpPairs(1);
  const big = Buffer.alloc(3 << 20, 'z');
  const sessions = app({
    export: (h, clients) => (h === 'a/1/b' ? [[clients[0], big], [clients[1], 'tail']] : []),
    connections: (h) => (h === 'a/3/b' ? [{ client: '127.0.0.1', socket: appEnd }] : []),
  });
  await withAgent(sessions, async (agent) => {
    // The agent reads nothing until all three are answered: the first answer's last bytes
    // wait in libuv for room in the kernel, so the second (short) answer waits in the
    // socket's own buffer when the third, with its descriptor, is written.
    await agent.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['127.0.0.1', '127.0.0.2'], connections: true });
    await agent.send({ id: 2, op: 'import', handoff: 'c/2/a', bytes: 2, sessions: [{ client: '198.18.1.5', len: 2 }] }, { raw: 'hi' });
    await agent.send({ id: 3, op: 'export', handoff: 'a/3/b', clients: ['127.0.0.1'], connections: true });
    await sleep(200);
    const first = await agent.read();
    assert.deepEqual(first.msg, { id: 1, ok: true, bytes: big.length + 4, sessions: [{ client: '127.0.0.1', len: big.length }, { client: '127.0.0.2', len: 4 }] });
    assert.ok(first.raw === `${big}tail`, 'the blobs, whole and alone');
    assert.deepEqual((await agent.read()).msg, { id: 2, ok: true });
    const third = await agent.read();
    assert.deepEqual(third.msg, { id: 3, ok: true, fds: 1, sessions: [], connections: [{ client: '127.0.0.1', len: 0 }] });
    const { peer } = await agent.call('name', { fd: third.fds[0] });
    assert.equal(peer[1], client.localPort);
  });
  client.destroy();
});

test('writeWithDescriptors: what the socket took before leaves first, even what it still buffers', { skip }, async () => {
  const fds = require('../lib/fds');
  const agent = await FdAgent.start();
  const [[client, appEnd]] = await tcpPairs(1);
  const sock = fds.ipcSocket(() => {});
  try {
    sock.connect(agent.path);
    await agent.call('accept');
    if (sock.connecting) await once(sock, 'connect');
    const big = Buffer.alloc(2 << 20, 'z');
    // More than the kernel takes while the agent reads nothing: libuv holds the rest, and the
    // next write waits in the socket's own buffer.
    sock.write(`{"id":1,"bytes":${big.length}}\n`);
    sock.write(big);
    sock.write('{"id":2}\n');
    assert.ok(sock.writableLength > 0 && sock._writableState.buffered.length > 0, 'bytes wait in the socket\'s buffer');
    const sent = fds.writeWithDescriptors(sock, Buffer.from('{"id":3,"fds":1}\n'), [appEnd._handle], 5000);
    const first = await agent.read();
    assert.deepEqual(first.msg, { id: 1, bytes: big.length });
    assert.ok(first.raw === big.toString());
    assert.deepEqual((await agent.read()).msg, { id: 2 });
    const third = await agent.read();
    assert.deepEqual(third.msg, { id: 3, fds: 1 });
    assert.deepEqual(await sent, [true]);
    assert.equal((await agent.call('name', { fd: third.fds[0] })).peer[1], client.localPort);
    sock.write('{"id":4}\n');
    assert.deepEqual((await agent.read()).msg, { id: 4 }, 'what it takes once done, after');
  } finally {
    sock.destroy();
    client.destroy();
    appEnd.destroy();
    await agent.stop();
  }
});

test('several descriptors in one sendmsg: Node takes one per read, so the line comes short and the connection ends (the agent writes one per sendmsg)', { skip }, async () => {
  // libuv accepts one descriptor per read callback and holds the others of a message until
  // more bytes arrive; none do while the agent waits for the answer.
  const sessions = app();
  await withAgent(sessions, async (agent, hook, log) => {
    const made = [];
    for (let i = 0; i < 3; i++) made.push(await agent.call('pair'));
    await agent.send({ id: 1, op: 'commit', handoff: 'c/1/a', fds: 3, connections: made.map(() => ({ client: '198.18.1.5', len: 0 })) }, { fds: made.map((m) => m.server), perSend: 3 });
    assert.deepEqual(await agent.read(), { ok: true, eof: true });
    assert.ok(log.some((m) => /a line announcing 3 descriptors came with 1/.test(m)), log.join('\n'));
    assert.deepEqual(sessions.calls, []);
  });
});

test('connections that cannot leave as they are stay with the application and come back with the outcome', { skip }, async () => {
  const [[c1, unread], [c2, idle], [c3, stranger]] = await tcpPairs(3);
  // Bytes read and not consumed: `unread` is paused with the client's bytes in its buffer.
  unread.pause();
  c1.write('GET');
  while (unread.readableLength < 3) await sleep(5);
  let back = null;
  const sessions = app({
    connections: () => [
      { client: '127.0.0.1', socket: unread, blob: 'u' },
      { client: '127.0.0.1', socket: idle },
      { client: '198.18.9.9', socket: stranger, blob: 's' },
      { client: '127.0.0.1', socket: 'not a socket' },
    ],
    adopt(h, conns) {
      back = conns;
    },
  });
  await withAgent(sessions, async (agent, hook, log) => {
    await agent.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['127.0.0.1'], connections: true });
    const { msg, raw, fds } = await agent.read();
    assert.deepEqual(msg, { id: 1, ok: true, fds: 1, sessions: [], connections: [{ client: '127.0.0.1', len: 0 }] });
    assert.equal(raw, null);
    assert.equal(fds.length, 1);
    assert.equal(idle.destroyed, true);
    assert.ok(!unread.destroyed && !stranger.destroyed, 'kept');
    assert.ok(log.some((m) => /3 bytes of it were read and not consumed/.test(m)), log.join('\n'));
    assert.ok(log.some((m) => /198\.18\.9\.9.* is not one the export lists/.test(m)), log.join('\n'));
    await agent.send({ id: 2, op: 'abort', handoff: 'a/1/b' });
    assert.deepEqual((await agent.read()).msg, { id: 2, ok: true });
    assert.deepEqual(back.map((c) => [c.client, c.blob.toString()]), [['127.0.0.1', 'u'], ['198.18.9.9', 's']]);
    assert.equal(back[0].socket, unread, 'the same socket, its unread bytes still in it');
    assert.equal(unread.read().toString(), 'GET');
    await agent.call('close', { fd: fds[0] });
  });
  for (const s of [c1, c2, c3, unread, stranger]) s.destroy();
});

test('a line announcing more descriptors than came ends the connection; the one that came is closed', { skip }, async () => {
  const sessions = app();
  await withAgent(sessions, async (agent) => {
    const made = await agent.call('pair');
    await agent.send({ id: 1, op: 'commit', handoff: 'c/1/a', fds: 2, connections: [{ client: '198.18.1.5', len: 0 }, { client: '198.18.1.6', len: 0 }] }, { fds: [made.server] });
    await agent.call('close', { fd: made.server });
    assert.deepEqual(await agent.read(), { ok: true, eof: true }, 'the SDK closed the connection');
    // The application's copy was closed too: the client end sees the connection end.
    assert.deepEqual(await agent.call('recv', { fd: made.client, n: 1 }), { ok: true, data: '', eof: true });
    assert.deepEqual(sessions.calls, [], 'nothing applied');
    await agent.call('accept');
    assert.equal((await agent.read()).msg.op, 'register', 'and it registers again');
  });
});

test('a commit whose connections do not match its descriptors is refused, its descriptors closed', { skip }, async () => {
  const sessions = app();
  await withAgent(sessions, async (agent) => {
    const made = await agent.call('pair');
    await agent.send({ id: 1, op: 'commit', handoff: 'c/1/a', fds: 1, connections: [] }, { fds: [made.server] });
    await agent.call('close', { fd: made.server });
    const { msg } = await agent.read();
    assert.equal(msg.ok, false);
    assert.match(msg.error, /0 connections came with 1 descriptors/);
    assert.deepEqual(await agent.call('recv', { fd: made.client, n: 1 }), { ok: true, data: '', eof: true });
    await agent.send({ id: 2, op: 'commit', handoff: 'c/1/a' });
    assert.deepEqual((await agent.read()).msg, { id: 2, ok: true }, 'sent again, applied');
    assert.deepEqual(sessions.calls, [['commit', 'c/1/a']]);
  });
});

test('an application without adopt() has the connections it is given closed', { skip }, async () => {
  const sessions = app({ connections: undefined, adopt: undefined });
  await withAgent(sessions, async (agent, hook, log) => {
    const made = await agent.call('pair');
    await agent.send({ id: 1, op: 'commit', handoff: 'c/1/a', fds: 1, connections: [{ client: '198.18.1.5', len: 0 }] }, { fds: [made.server] });
    assert.deepEqual((await agent.read()).msg, { id: 1, ok: true });
    await agent.call('close', { fd: made.server });
    assert.deepEqual(await agent.call('recv', { fd: made.client, n: 1 }), { ok: true, data: '', eof: true });
    assert.ok(log.some((m) => /adopts none/.test(m)));
  });
});

test('version 3 makes no deprecation warning, not even under --pending-deprecation --throw-deprecation', { skip }, async () => {
  const agent = await FdAgent.start();
  try {
    const script = `
      const { attach } = require(${JSON.stringify(require.resolve('..'))});
      const hook = attach({ socket: ${JSON.stringify(agent.path)}, service: '${SERVICE}', log: null,
        sessions: { export: () => [], import() {}, commit() {}, abort() {} } });
      hook.on('registered', ({ version }) => { console.log('registered', version); hook.close(); });`;
    const child = require('child_process').spawn(process.execPath, ['--pending-deprecation', '--throw-deprecation', '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let [out, err] = ['', ''];
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    await agent.call('accept');
    assert.equal((await agent.read()).msg.version, 3);
    await agent.send({ op: 'registered', service: SERVICE, version: 3 });
    const [code] = await once(child, 'exit');
    assert.equal(err, '');
    assert.equal(out, 'registered 3\n');
    assert.equal(code, 0);
  } finally {
    await agent.stop();
  }
  // And with --no-deprecation (which makes process.noDeprecation read-only).
  const r = spawnSync(process.execPath, ['--no-deprecation', '-e', `console.log(require(${JSON.stringify(require.resolve('../lib/fds'))}).whyNot())`], { encoding: 'utf8' });
  assert.equal(r.stdout + r.stderr, 'null\n');
});
