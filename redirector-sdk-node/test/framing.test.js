'use strict';

const assert = require('assert/strict');
const { test } = require('node:test');
const { MessageReader } = require('../lib/framing');

function reader({ rawBytes = false } = {}) {
  const got = [];
  const r = new MessageReader((msg, raw) => got.push({ msg, raw: raw && raw.toString() }), (line, err) => got.push({ bad: line.toString(), err: err.message }));
  r.rawBytes = rawBytes;
  return { r, got };
}

function bytewise(r, s) {
  const b = Buffer.from(s);
  for (let i = 0; i < b.length; i++) r.push(b.subarray(i, i + 1));
}

test('a line split across many chunks, and several lines in one chunk', () => {
  const { r, got } = reader();
  bytewise(r, '{"op":"registered","service":"198.18.0.10:80","version":1}\n{"id":1,');
  assert.deepEqual(got, [{ msg: { op: 'registered', service: '198.18.0.10:80', version: 1 }, raw: null }]);
  r.push(Buffer.from('"op":"commit","handoff":"a/1/b"}\n{"id":2}\n{"id":3}\n'));
  assert.deepEqual(got.slice(1).map((g) => g.msg.id), [1, 2, 3]);
});

test('a multi-byte UTF-8 character split between chunks', () => {
  const { r, got } = reader();
  bytewise(r, '{"error":"déjà ✓"}\n');
  assert.equal(got[0].msg.error, 'déjà ✓');
});

test('raw bytes split across chunks, the next line in the same chunk as their end', () => {
  const { r, got } = reader({ rawBytes: true });
  bytewise(r, '{"id":2,"op":"import","bytes":9}\nabcd');
  assert.deepEqual(got, [], 'the line waits for its bytes');
  r.push(Buffer.from('h'));
  r.push(Buffer.from('ello{"id":3,"op":"commit"}\n{"id":4,"bytes":3}\n\n\n\n'));
  assert.deepEqual(got, [
    { msg: { id: 2, op: 'import', bytes: 9 }, raw: 'abcdhello' },
    { msg: { id: 3, op: 'commit' }, raw: null },
    { msg: { id: 4, bytes: 3 }, raw: '\n\n\n' },
  ]);
});

test('raw bytes are taken from version 2 on only, and only for a positive integer `bytes`', () => {
  const { r, got } = reader();
  r.push(Buffer.from('{"id":1,"bytes":3}\n'));
  r.rawBytes = true;
  r.push(Buffer.from('{"id":2,"bytes":0}\n{"id":3,"bytes":"3"}\n{"id":4,"bytes":-1}\n[1]\n{"id":5,"bytes":1}\nx'));
  assert.deepEqual(got.map((g) => [g.msg, g.raw]), [
    [{ id: 1, bytes: 3 }, null],
    [{ id: 2, bytes: 0 }, null],
    [{ id: 3, bytes: '3' }, null],
    [{ id: 4, bytes: -1 }, null],
    [[1], null],
    [{ id: 5, bytes: 1 }, 'x'],
  ]);
});

test('a line that is not JSON is reported and the next one read', () => {
  const { r, got } = reader({ rawBytes: true });
  r.push(Buffer.from('this is not JSON\n{"id":1}\n'));
  assert.equal(got[0].bad, 'this is not JSON');
  assert.deepEqual(got[1], { msg: { id: 1 }, raw: null });
});

test('version 3: each line announcing descriptors takes the first ones received, in order', () => {
  const got = [];
  const broken = [];
  const r = new MessageReader((msg, raw, fds) => got.push([msg.id, raw && raw.toString(), fds]), () => {}, (err) => broken.push(err.message));
  r.rawBytes = true;
  r.descriptors = true;
  // Descriptors come with (or before) the bytes of their line: a line's are in by its end.
  r.pushDescriptor('a');
  r.push(Buffer.from('{"id":1,"fds":2'));
  r.pushDescriptor('b');
  r.pushDescriptor('c');
  r.push(Buffer.from(',"bytes":3}\nxy'));
  assert.deepEqual(got, [], 'the line waits for its bytes');
  r.push(Buffer.from('z{"id":2}\n{"id":3,"fds":0}\n{"id":4,"fds":1}\n'));
  assert.deepEqual(got, [[1, 'xyz', ['a', 'b']], [2, null, []], [3, null, []], [4, null, ['c']]]);
  assert.deepEqual(broken, []);
  assert.deepEqual(r.takeDescriptors(), []);
});

test('version 3: a line announcing more descriptors than came, or a bad fds, breaks the stream', () => {
  for (const [line, why] of [['{"id":1,"fds":2}\n', /announcing 2 descriptors came with 1/], ['{"id":1,"fds":"1"}\n', /"fds" is not a non-negative integer/], ['{"id":1,"fds":-1}\n', /not a non-negative integer/]]) {
    const got = [];
    const broken = [];
    const r = new MessageReader((msg) => got.push(msg), () => {}, (err) => broken.push(err.message));
    r.descriptors = true;
    r.pushDescriptor('a');
    r.push(Buffer.from(`${line}{"id":2}\n`));
    assert.deepEqual(got, [], 'nothing more is read');
    assert.equal(broken.length, 1);
    assert.match(broken[0], why);
    assert.deepEqual(r.takeDescriptors(), ['a'], 'what it holds, to close');
  }
});

test('before version 3, fds is an ordinary field', () => {
  const got = [];
  const r = new MessageReader((msg, raw, fds) => got.push([msg, fds]), () => {});
  r.push(Buffer.from('{"id":1,"fds":2}\n'));
  assert.deepEqual(got, [[{ id: 1, fds: 2 }, []]]);
});
