'use strict';

const assert = require('assert/strict');
const { test } = require('node:test');
const { normalizeClient } = require('..');

test('client addresses in the agent\'s form', () => {
  const cases = [
    ['198.18.1.5', '198.18.1.5'],
    ['::ffff:198.18.1.5', '198.18.1.5'],
    ['::FFFF:198.18.1.5', '198.18.1.5'],
    ['::ffff:c612:105', '198.18.1.5'],
    ['2001:DB8:0:0:0:0:0:5', '2001:db8::5'],
    ['2001:db8:0:1:0:0:0:5', '2001:db8:0:1::5'],
    ['2001:db8:0:0:1:0:0:1', '2001:db8::1:0:0:1'],
    ['2001:db8::1:0:0:1', '2001:db8::1:0:0:1'],
    ['::1', '::1'],
  ];
  for (const [addr, want] of cases) assert.equal(normalizeClient(addr), want, addr);
});

test('what is not a client address', () => {
  for (const addr of ['', 'x', '198.18.1', '198.18.1.05', '198.18.1.256', 'fe80::1%eth0', '[2001:db8::5]', '198.18.1.5:80', null, undefined, 5]) {
    assert.equal(normalizeClient(addr), null, String(addr));
  }
});
