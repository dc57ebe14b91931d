'use strict';
// Replays the hook transcripts (the shared ones of the repository, `redirector-hook/transcripts`,
// and this package's own) against the SDK: a fake agent sends the `agent` lines and checks
// that the SDK, serving the fixture application of the transcript format, sends the `app`
// lines, and that the fixture holds the `state`s.

const assert = require('assert/strict');
const fs = require('fs');
const path = require('path');
const { test } = require('node:test');
const { FakeAgent } = require('./fake-agent');

const DIRS = [path.join(__dirname, '../../redirector-hook/transcripts'), path.join(__dirname, 'transcripts')];

/**
 * The fixture application: sessions are text by client, each imported one tagged with its
 * hand-over; export returns the listed clients' sessions in their order; commit of an
 * exported hand-over drops its clients' sessions; abort drops the sessions still tagged with
 * the aborted hand-over. It hands no connection over (the fake agent passes no descriptors).
 */
function fixture(initial) {
  const held = new Map(Object.entries(initial).map(([c, text]) => [c, { text, tag: null }]));
  const exported = new Map();
  return {
    export(handoff, clients) {
      exported.set(handoff, clients);
      return clients.filter((c) => held.has(c)).map((c) => [c, Buffer.from(held.get(c).text)]);
    },
    import(handoff, sessions) {
      for (const [c, blob] of sessions) held.set(c, { text: blob.toString(), tag: handoff });
    },
    commit(handoff) {
      for (const c of exported.get(handoff) ?? []) held.delete(c);
      exported.delete(handoff);
      for (const s of held.values()) if (s.tag === handoff) s.tag = null;
    },
    abort(handoff) {
      exported.delete(handoff);
      for (const [c, s] of held) if (s.tag === handoff) held.delete(c);
    },
    // Version 3: it has no open connection to hand over, and would serve those it is given.
    connections() {
      return [];
    },
    adopt() {},
    state() {
      return Object.fromEntries([...held].map(([c, s]) => [c, s.text]));
    },
  };
}

// An `error` field is compared for presence only.
function comparable(msg) {
  return msg && typeof msg === 'object' && 'error' in msg ? { ...msg, error: '(present)' } : msg;
}

async function replay(file) {
  const entries = fs.readFileSync(file, 'utf8').split('\n').map((l, i) => [i + 1, l]).filter(([, l]) => l.trim() !== '').map(([n, l]) => [n, JSON.parse(l)]);
  const initial = entries.find(([, e]) => e.state)?.[1].state ?? {};
  const register = entries.find(([, e]) => e.app)?.[1].app;
  assert.equal(register?.op, 'register', `${file}: the first app line is the register line`);
  const app = fixture(initial);
  const agent = await FakeAgent.start();
  const log = [];
  agent.attach({
    service: register.service,
    // A transcript that registers with version 1 or 2 forces it; one with 3 lets the SDK
    // negotiate (it offers 3 first).
    version: register.version < 3 ? register.version : undefined,
    sessions: app,
    log: (m) => log.push(m),
  });
  let conn = await agent.accept();
  let stateSeen = false;
  try {
    for (const [n, e] of entries) {
      const where = `${path.basename(file)}:${n}`;
      if (e.state) {
        if (stateSeen) assert.deepEqual(app.state(), e.state, `${where}: the application's sessions`);
        stateSeen = true;
      } else if (e.agent) {
        conn.send(e.agent, e.raw === undefined ? undefined : Buffer.from(e.raw));
      } else if (e.app) {
        const got = await conn.read().catch((err) => assert.fail(`${where}: ${err.message} (expected ${JSON.stringify(e.app)}); SDK log: ${log.join(' | ')}`));
        assert.deepEqual(comparable(got.msg), comparable(e.app), `${where}: the application's line${got.line === undefined ? '' : ` (not JSON: ${got.line})`}`);
        assert.deepEqual(got.raw?.toString() ?? null, e.raw ?? null, `${where}: the raw bytes after the application's line`);
      } else if (e.reconnect) {
        conn.close();
        conn = await agent.accept().catch((err) => assert.fail(`${where}: ${err.message}`));
      } else {
        assert.ok(e.comment !== undefined, `${where}: an entry of no known kind: ${JSON.stringify(e)}`);
      }
    }
    // Nothing more to say: no answer the transcript did not expect.
    const extra = await conn.read(100).catch(() => null);
    assert.equal(extra, null, `${path.basename(file)}: a line after the transcript's end: ${JSON.stringify(extra?.msg)}`);
  } finally {
    await agent.stop();
  }
}

for (const dir of DIRS) {
  if (!fs.existsSync(dir)) continue;
  for (const f of fs.readdirSync(dir).filter((f) => f.endsWith('.jsonl')).sort()) {
    test(`transcript ${path.relative(path.join(__dirname, '..'), path.join(dir, f))}`, () => replay(path.join(dir, f)));
  }
}

test('this package has transcripts to replay', () => {
  assert.ok(fs.readdirSync(DIRS[1]).some((f) => f.endsWith('.jsonl')));
});
