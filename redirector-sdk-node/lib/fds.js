'use strict';
// Descriptors passed with lines (hook protocol version 3, docs/app-protocol.md section 2b):
// the open TCP connections that move with their sessions, as SCM_RIGHTS on the hook's Unix
// socket.
//
// Node's public `net` API neither sends nor receives descriptors. Its child_process IPC does,
// through libuv IPC pipes; this module uses the same internal bindings the same way
// (`process.binding`, allow-listed for these modules in Node 20):
// - the hook connection is a `net.Socket` around a `Pipe` opened in IPC mode, so libuv reads
//   it with recvmsg(2) and takes the descriptors that come with the bytes;
// - libuv accepts one received descriptor per read callback, which Node's stream wrap sets as
//   the pipe's `pendingHandle` (a TCP wrap for a TCP socket) just before it calls `onread`:
//   a wrapper around `onread` takes it there, in arrival order, before the bytes it came with
//   reach the stream;
// - writes carry one descriptor each (`writeBuffer(req, bytes, handle)`, as child_process's
//   channel does): a line with N descriptors leaves in N pieces, each with one.
//
// What the writer must do for Node (measured with Node 20.20, libuv 1.46): attach at most one
// descriptor to each sendmsg(2). libuv hands over one descriptor per read callback and keeps
// the rest of a message's descriptors queued until later bytes arrive (none do while the
// agent waits for the answer), and it reads with room for 60 descriptors: the kernel drops
// the rest of a bigger message's (MSG_CTRUNC, which libuv ignores). One descriptor per
// sendmsg arrives at once: the kernel ends every read at a message that carries descriptors.

const net = require('net');
const { getSystemErrorName } = require('util');

let bindings; // undefined: not looked up yet; null: not available (see `unavailable`)
let unavailable = null;

// process.binding is deprecated in the documentation only (DEP0111): silent by default, but a
// warning (an exception with --throw-deprecation) under --pending-deprecation. Looked up once,
// with deprecation warnings off meanwhile: the application's output stays as it was.
function quietly(f) {
  const own = Object.getOwnPropertyDescriptor(process, 'noDeprecation');
  if (own && !own.writable && !own.set) return f(); // --no-deprecation: fixed, and silent already
  process.noDeprecation = true;
  try {
    return f();
  } finally {
    if (own) process.noDeprecation = own.value;
    else delete process.noDeprecation;
  }
}

function load() {
  if (bindings !== undefined) return bindings;
  try {
    bindings = quietly(() => {
      const { Pipe, constants } = process.binding('pipe_wrap');
      const { WriteWrap, streamBaseState, kLastWriteWasAsync } = process.binding('stream_wrap');
      const { TCP } = process.binding('tcp_wrap');
      if (typeof Pipe !== 'function' || typeof constants?.IPC !== 'number' || typeof WriteWrap !== 'function' || typeof TCP !== 'function' || !streamBaseState || typeof kLastWriteWasAsync !== 'number') {
        throw new Error('this Node.js has no libuv IPC pipes where redirector-sdk looks for them');
      }
      if (typeof Pipe.prototype.writeBuffer !== 'function' || typeof Pipe.prototype.readStart !== 'function') {
        throw new Error('this Node.js\'s pipes lack writeBuffer/readStart');
      }
      return { Pipe, IPC: constants.IPC, WriteWrap, streamBaseState, kLastWriteWasAsync, TCP };
    });
  } catch (err) {
    bindings = null;
    unavailable = err.message;
  }
  return bindings;
}

/** Whether this Node.js can pass descriptors (version 3); `null` if it can, else why not. */
function whyNot() {
  return load() ? null : unavailable;
}

/**
 * A `net.Socket` (not connected yet: `connect(path)` it) whose handle is a libuv IPC pipe,
 * calling `onDescriptor(handle)` with each descriptor received, in arrival order, before the
 * bytes it came with are pushed to the stream.
 */
function ipcSocket(onDescriptor) {
  const { Pipe, IPC } = load();
  const handle = new Pipe(IPC);
  // manualStart: no read before the connection is made (connect() reuses this handle and
  // starts reading once connected).
  const sock = new net.Socket({ handle, manualStart: true });
  const onread = handle.onread; // net's, set by the constructor
  handle.onread = function onreadWithDescriptor(...args) {
    const received = handle.pendingHandle;
    if (received) {
      handle.pendingHandle = null;
      onDescriptor(received);
    }
    return onread.apply(this, args);
  };
  return sock;
}

/**
 * A `net.Socket` for a received descriptor's handle. It reads nothing until its owner
 * listens for data (or resumes it), as a connection just accepted by a net.Server would if
 * it were paused: whatever the client sent meanwhile waits in the kernel.
 */
function socketFor(handle) {
  return new net.Socket({ handle, readable: true, writable: true, manualStart: true });
}

/** Whether a received handle is a stream (a TCP or Unix socket) a net.Socket can wrap. */
function isStream(handle) {
  const b = load();
  return Boolean(b) && (handle instanceof b.TCP || handle instanceof b.Pipe);
}

/** Whether `socket` is a TCP connection whose descriptor can be passed. */
function isTcp(socket) {
  const b = load();
  return Boolean(b) && socket?._handle instanceof b.TCP;
}

/** Closes a received handle that no net.Socket wraps. */
function closeHandle(handle) {
  try {
    handle.close();
  } catch {
    // closed already
  }
}

/**
 * Resolves once everything `sock` took through `write()` is with libuv (in the kernel, or in
 * libuv's queue, which keeps the order), at once when nothing waits.
 */
function flushed(sock) {
  if (sock.destroyed || sock.writableLength === 0) return Promise.resolve();
  return new Promise((resolve) => sock.write('', () => resolve()));
}

/**
 * Writes `line` (a Buffer) on the IPC socket `sock` with one descriptor per entry of
 * `handles` (net handles, e.g. `socket._handle`): N pieces, the first N-1 one byte each and
 * the last the rest, each carrying its descriptor (one sendmsg each). Everything the socket
 * took before through `write()` leaves first (also what it still buffers); what it takes once
 * this resolves, after (write nothing else meanwhile). Resolves once
 * every piece is written (or failed): an array saying, for each descriptor, whether it left.
 * `stallMs`: a write that cannot finish for that long ends the connection.
 */
async function writeWithDescriptors(sock, line, handles, stallMs) {
  if (line.length < handles.length) throw new Error(`a line of ${line.length} bytes cannot carry ${handles.length} descriptors`);
  // Data the stream still buffers goes first. (Nothing waits: the pieces are written now, in
  // this very tick.)
  if (sock.writableLength > 0) await flushed(sock);
  const handle = sock._handle;
  if (sock.destroyed || !handle) return handles.map(() => false);
  const { WriteWrap, streamBaseState, kLastWriteWasAsync } = load();
  const pieces = [];
  for (let i = 0; i < handles.length; i++) {
    const piece = line.subarray(i, i === handles.length - 1 ? line.length : i + 1);
    let settle;
    const done = new Promise((resolve) => (settle = resolve));
    const req = new WriteWrap();
    req.handle = handle;
    req.buffer = piece; // kept alive until written
    req.async = false;
    req.oncomplete = (status) => settle(status === 0);
    const err = handle.writeBuffer(req, piece, handles[i]);
    if (err !== 0) {
      // Nothing more may follow a piece that did not go: the line would be corrupt.
      sock.destroy(new Error(`writing descriptors to the agent: ${getSystemErrorName(err)}`));
      settle(false);
      pieces.push(done);
      while (pieces.length < handles.length) pieces.push(Promise.resolve(false));
      break;
    }
    if (!streamBaseState[kLastWriteWasAsync]) settle(true);
    pieces.push(done);
  }
  const timer = setTimeout(() => sock.destroy(new Error(`the agent read nothing for ${stallMs / 1000} s`)), stallMs);
  try {
    return await Promise.all(pieces);
  } finally {
    clearTimeout(timer);
  }
}

module.exports = { whyNot, ipcSocket, socketFor, isStream, isTcp, closeHandle, flushed, writeWithDescriptors };
