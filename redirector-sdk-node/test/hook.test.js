'use strict';
// The hook against a fake agent: what the transcripts cannot show (timing, async callbacks,
// failing callbacks, big messages, the connection's life).

const assert = require('assert/strict');
const crypto = require('crypto');
const { test } = require('node:test');
const { once } = require('events');
const { setTimeout: sleep } = require('timers/promises');
const { FakeAgent } = require('./fake-agent');

const SERVICE = '198.18.0.10:80';

const app = require('./recording-app').recordingApp;

// Attaches to `agent`, accepts the connection and registers it with `version`.
async function connected(agent, sessions, { version = 2, force } = {}) {
  const hook = agent.attach({ service: SERVICE, sessions, version: force });
  const conn = await agent.accept();
  const { msg } = await conn.read();
  assert.equal(msg.version, force ?? 3);
  conn.send({ op: 'registered', service: SERVICE, version });
  return { hook, conn, register: msg };
}

async function withAgent(f) {
  const agent = await FakeAgent.start();
  try {
    await f(agent);
  } finally {
    await agent.stop();
  }
}

test('requests apply in arrival order even when callbacks are async', () => withAgent(async (agent) => {
  const order = [];
  const sessions = app({
    async export(h, clients) {
      order.push(`export ${h} starts`);
      await sleep(50);
      order.push(`export ${h} ends`);
      return clients.map((c) => [c, Buffer.from('s')]);
    },
    commit: (h) => void order.push(`commit ${h}`),
    async import(h) {
      await sleep(10);
      order.push(`import ${h}`);
    },
  });
  const { conn } = await connected(agent, sessions);
  conn.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['198.18.1.5'] });
  conn.send({ id: 2, op: 'commit', handoff: 'a/1/b' });
  conn.send({ id: 3, op: 'import', handoff: 'c/2/a', bytes: 1, sessions: [{ client: '198.18.1.9', len: 1 }] }, 'x');
  conn.send({ id: 4, op: 'abort', handoff: 'c/2/a' });
  const ids = [];
  for (let i = 0; i < 4; i++) ids.push((await conn.read()).msg.id);
  assert.deepEqual(ids, [1, 2, 3, 4]);
  assert.deepEqual(order, ['export a/1/b starts', 'export a/1/b ends', 'commit a/1/b', 'import c/2/a']);
}));

test('clients are normalised for the callback and in the answer', () => withAgent(async (agent) => {
  const sessions = app({ export: () => [['::ffff:198.18.1.5', 'five'], ['2001:DB8::5', new Uint8Array([104, 105])]] });
  const { conn } = await connected(agent, sessions, { version: 1, force: 1 });
  // (The agent writes canonical addresses; the SDK does not rely on it.)
  conn.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['::ffff:198.18.1.5', '2001:db8:0::5'] });
  assert.deepEqual((await conn.read()).msg, { id: 1, ok: true, sessions: [{ client: '198.18.1.5', blob: Buffer.from('five').toString('base64') }, { client: '2001:db8::5', blob: 'aGk=' }] });
}));

test('failing callbacks are answered ok:false with their reason; commit and abort are asked again', () => withAgent(async (agent) => {
  let failCommit = true;
  const sessions = app({
    export: () => [['198.18.1.99', 'not asked for']],
    import: () => {
      throw new Error('no room for these sessions');
    },
    commit: () => {
      if (failCommit) throw new Error('disk full');
    },
  });
  const { conn } = await connected(agent, sessions);
  conn.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['198.18.1.5'] });
  const exp = (await conn.read()).msg;
  assert.equal(exp.ok, false);
  assert.match(exp.error, /exported 198\.18\.1\.99, which the export did not list/);
  conn.send({ id: 2, op: 'import', handoff: 'c/2/a', bytes: 2, sessions: [{ client: '198.18.1.9', len: 2 }] }, 'hi');
  assert.deepEqual((await conn.read()).msg, { id: 2, ok: false, error: 'the application refused the import: no room for these sessions' });
  conn.send({ id: 3, op: 'commit', handoff: 'a/1/b' });
  assert.match((await conn.read()).msg.error, /disk full/);
  conn.send({ id: 4, op: 'dance', handoff: 'a/1/b' });
  assert.deepEqual((await conn.read()).msg, { id: 4, ok: false, error: 'unknown op "dance"' });
  conn.send({ id: 5, op: 'commit' });
  assert.deepEqual((await conn.read()).msg, { id: 5, ok: false, error: 'malformed commit: no handoff' });
  // Until the agent hears ok, both hand-overs are unfinished (the refused import too: its
  // abort follows).
  conn.close();
  const again = await agent.accept();
  assert.deepEqual((await again.read()).msg.pending, [
    { handoff: 'a/1/b', role: 'export', clients: ['198.18.1.5'] },
    { handoff: 'c/2/a', role: 'import', clients: ['198.18.1.9'] },
  ]);
  again.send({ op: 'registered', service: SERVICE, version: 2 });
  failCommit = false;
  again.send({ id: 1, op: 'commit', handoff: 'a/1/b' });
  assert.deepEqual((await again.read()).msg, { id: 1, ok: true });
}));

test('a request that is not JSON is refused by its id; other such lines are ignored', () => withAgent(async (agent) => {
  const { conn } = await connected(agent, app(), { version: 1, force: 1 });
  conn.sock.write('{"id":7,"op":"import","handoff":"c/1/a","sessions":[{"client":"198.18.1.5","blob":"aGk=\n');
  conn.sock.write('not even a request\n');
  conn.send({ id: 8, op: 'commit', handoff: 'c/1/a' });
  const refused = (await conn.read()).msg;
  assert.equal(refused.id, 7);
  assert.equal(refused.ok, false);
  assert.match(refused.error, /unreadable request/);
  assert.deepEqual((await conn.read()).msg, { id: 8, ok: true });
}));

test('the hook waits for an agent that is away, registers once it is there, and stops on close', async () => {
  const agent = FakeAgent.away();
  try {
    const events = [];
    const hook = agent.attach({ service: SERVICE, sessions: app(), log: (m) => events.push(`log ${m}`) });
    hook.on('disconnected', (err) => events.push(`disconnected ${err.message}`));
    hook.on('registered', (r) => events.push(`registered ${r.version}`));
    await once(hook, 'disconnected');
    await once(hook, 'disconnected');
    assert.ok(events.filter((e) => e.startsWith('disconnected')).length >= 2, `tried again and again: ${events}`);
    assert.equal(events.filter((e) => e.startsWith('log')).length, 1, `said once: ${events}`);
    await agent.listen();
    const conn = await agent.accept();
    assert.equal((await conn.read()).msg.op, 'register');
    const registered = once(hook, 'registered');
    conn.send({ op: 'registered', service: SERVICE, version: 2 });
    assert.deepEqual(await registered, [{ version: 2, pending: 0 }]);
    await hook.close();
    await assert.rejects(agent.accept(100), /no connection/, 'closed: no reconnection');
  } finally {
    await agent.stop();
  }
});

test('the version an agent refused is not offered again on that socket, one version at a time; a forced version is', () => withAgent(async (agent) => {
  for (const version of [3, 2]) {
    const forced = agent.attach({ service: SERVICE, sessions: app(), version });
    for (let i = 0; i < 2; i++) {
      const conn = await agent.accept();
      assert.equal((await conn.read()).msg.version, version, 'forced: no fallback');
      conn.send({ op: 'error', error: `this agent speaks hook protocol version 1, not ${version}` });
    }
    await forced.close();
  }
  const first = agent.attach({ service: SERVICE, sessions: app() });
  let conn = await agent.accept();
  assert.equal((await conn.read()).msg.version, 3);
  conn.send({ op: 'error', error: 'this agent speaks hook protocol versions 1 and 2, not 3' });
  conn = await agent.accept();
  assert.equal((await conn.read()).msg.version, 2);
  conn.send({ op: 'error', error: 'this agent speaks hook protocol version 1, not 2' });
  conn = await agent.accept();
  assert.equal((await conn.read()).msg.version, 1);
  conn.send({ op: 'registered', service: SERVICE, version: 1 });
  await first.close();
  const later = agent.attach({ service: SERVICE, sessions: app() });
  conn = await agent.accept();
  assert.equal((await conn.read()).msg.version, 1, 'remembered for the socket');
  await later.close();
}));

test('an agent that speaks versions 1 and 2 gets version 2, remembered for the socket', () => withAgent(async (agent) => {
  const sessions = app({ export: (h, clients) => clients.map((c) => [c, 'five']) });
  const first = agent.attach({ service: SERVICE, sessions });
  let conn = await agent.accept();
  assert.equal((await conn.read()).msg.version, 3);
  conn.send({ op: 'error', error: 'this agent speaks hook protocol versions 1 and 2, not 3' });
  conn = await agent.accept();
  assert.equal((await conn.read()).msg.version, 2);
  conn.send({ op: 'registered', service: SERVICE, version: 2 });
  conn.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['198.18.1.5'] });
  const { msg, raw } = await conn.read();
  assert.deepEqual(msg, { id: 1, ok: true, bytes: 4, sessions: [{ client: '198.18.1.5', len: 4 }] });
  assert.equal(raw.toString(), 'five');
  await first.close();
  const later = agent.attach({ service: SERVICE, sessions: app() });
  conn = await agent.accept();
  assert.equal((await conn.read()).msg.version, 2, 'remembered for the socket');
  await later.close();
}));

// 20 sessions of 1 MiB of random bytes each way, in every version (3: through the IPC pipe
// that passes descriptors), through chunked sockets.
for (const version of [1, 2, 3]) {
  test(`a 20 MB import and a 20 MB export (version ${version})`, () => withAgent(async (agent) => {
    const blobs = Array.from({ length: 20 }, (_, i) => [`198.18.2.${i}`, crypto.randomBytes(1 << 20)]);
    let imported = null;
    const sessions = app({
      import: (h, s) => {
        imported = s;
      },
      export: () => blobs,
    });
    const { conn } = await connected(agent, sessions, { version, force: version });
    if (version === 1) {
      conn.send({ id: 1, op: 'import', handoff: 'c/1/a', sessions: blobs.map(([client, b]) => ({ client, blob: b.toString('base64') })) });
    } else {
      const raw = Buffer.concat(blobs.map(([, b]) => b));
      conn.send({ id: 1, op: 'import', handoff: 'c/1/a', bytes: raw.length, sessions: blobs.map(([client, b]) => ({ client, len: b.length })) }, raw);
    }
    assert.deepEqual((await conn.read()).msg, { id: 1, ok: true });
    assert.equal(imported.length, 20);
    imported.forEach(([c, b], i) => assert.ok(c === blobs[i][0] && b.equals(blobs[i][1]), `session ${i} intact`));
    conn.send({ id: 2, op: 'export', handoff: 'a/2/b', clients: blobs.map(([c]) => c) });
    const { msg, raw } = await conn.read();
    const got = version === 1 ? msg.sessions.map((s) => Buffer.from(s.blob, 'base64')) : (() => {
      let at = 0;
      return msg.sessions.map((s) => raw.subarray(at, (at += s.len)));
    })();
    assert.equal(got.length, 20);
    got.forEach((b, i) => assert.ok(b.equals(blobs[i][1]), `exported session ${i} intact`));
  }));
}

test('requests queued behind a slow one when the connection drops: exports and imports are not started, outcomes apply', () => withAgent(async (agent) => {
  let started;
  const exporting = new Promise((resolve) => (started = resolve));
  let release;
  const released = new Promise((resolve) => (release = resolve));
  let aborted;
  const abortApplied = new Promise((resolve) => (aborted = resolve));
  const sessions = app({
    async export(h, clients) {
      sessions.calls.push(['export', h, clients]);
      started();
      await released;
      return [];
    },
    abort(h) {
      sessions.calls.push(['abort', h]);
      aborted();
    },
  });
  const { hook, conn } = await connected(agent, sessions);
  conn.send({ id: 1, op: 'export', handoff: 'a/1/b', clients: ['198.18.1.5'] });
  conn.send({ id: 2, op: 'export', handoff: 'a/2/b', clients: ['198.18.1.6'] });
  conn.send({ id: 3, op: 'abort', handoff: 'a/1/b' });
  await exporting;
  conn.close();
  const again = await agent.accept();
  // The export in progress is unfinished (its clients were frozen): reported; the next one
  // never started (the agent counts it failed).
  assert.deepEqual((await again.read()).msg.pending, [{ handoff: 'a/1/b', role: 'export', clients: ['198.18.1.5'] }]);
  release();
  await abortApplied;
  assert.deepEqual(sessions.calls, [['export', 'a/1/b', ['198.18.1.5']], ['abort', 'a/1/b']]);
  await sleep(10); // the SDK forgets the hand-over once the callback returned
  assert.equal(hook.pending().length, 0, 'the abort applied');
}));
