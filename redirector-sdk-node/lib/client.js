'use strict';

const net = require('net');

/**
 * A client address in the agent's form, or null if `addr` is not an IP address: IPv4 as
 * a.b.c.d, also when written IPv4-mapped (a dual-stack listener reports IPv4 clients as
 * ::ffff:a.b.c.d); IPv6 compressed and lower case (RFC 5952). Equal strings from this
 * function mean equal addresses, so sessions can be keyed by them.
 */
function normalizeClient(addr) {
  if (typeof addr !== 'string') return null;
  const dotted = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(addr);
  if (dotted) addr = dotted[1];
  if (net.isIPv4(addr)) return addr;
  if (!net.isIPv6(addr)) return null;
  let host;
  try {
    // The URL parser writes IPv6 hosts in the RFC 5952 form.
    host = new URL(`http://[${addr}]/`).hostname.slice(1, -1);
  } catch {
    return null; // a scoped address (fe80::1%eth0) is no client address
  }
  const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(host);
  if (mapped) {
    const [hi, lo] = [parseInt(mapped[1], 16), parseInt(mapped[2], 16)];
    return `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`;
  }
  return host;
}

module.exports = { normalizeClient };
