'use strict';
// Reading the hook's messages from a byte stream: JSON lines of any size, each followed (in
// version 2) by the `bytes` raw bytes its line announces, and carrying (in version 3) the
// `fds` descriptors it announces. Chunks are kept as they arrive and joined once per message,
// so a line or a blob of hundreds of MiB costs one copy, not one per chunk.

const { constants } = require('buffer');

const NEWLINE = 0x0a;

/**
 * Splits a stream into messages, calling back synchronously and in order:
 * `onMessage(msg, raw, fds)` for a JSON line (`raw`: a Buffer of the bytes that followed it,
 * or null; `fds`: an array of the descriptors it carried, empty unless it announced some),
 * `onBadLine(line, err)` for a line that is not JSON (nothing follows it), `onBroken(err)`
 * when the stream cannot be read any further (then nothing more is called back).
 * Set `rawBytes` once the connection speaks version 2: from the next line on, a top-level
 * `"bytes": N` makes the reader take N raw bytes after the line. Set `descriptors` once it
 * speaks version 3: a top-level `"fds": N` gives the line the first N descriptors received
 * (`pushDescriptor`, in arrival order); a line announcing more than came breaks the stream, as
 * does an `fds` that is not a non-negative integer.
 */
class MessageReader {
  constructor(onMessage, onBadLine, onBroken = () => {}) {
    this.onMessage = onMessage;
    this.onBadLine = onBadLine;
    this.onBroken = onBroken;
    this.rawBytes = false;
    this.descriptors = false;
    this.fds = []; // received, not given to a line yet: the oldest first
    this.broken = false;
    this.chunks = [];
    this.length = 0; // bytes in `chunks`
    this.head = null; // a parsed line waiting for its raw bytes
    this.headFds = null; // the descriptors `head` carried
    this.want = 0; // how many raw bytes `head` waits for
  }

  /** Takes a descriptor received with the stream's bytes (before those bytes are pushed). */
  pushDescriptor(fd) {
    this.fds.push(fd);
  }

  /** Every descriptor held (received, or carried by a line still waiting for its bytes), to close. */
  takeDescriptors() {
    const all = [...(this.headFds ?? []), ...this.fds];
    this.headFds = null;
    this.fds = [];
    return all;
  }

  /** Takes the next chunk of the stream. */
  push(chunk) {
    while (chunk.length > 0 && !this.broken) {
      if (this.head) {
        const take = Math.min(this.want - this.length, chunk.length);
        this.chunks.push(chunk.subarray(0, take));
        this.length += take;
        chunk = chunk.subarray(take);
        if (this.length === this.want) {
          const [head, raw, fds] = [this.head, this.take(), this.headFds];
          this.head = null;
          this.headFds = null;
          this.onMessage(head, raw, fds);
        }
        continue;
      }
      const i = chunk.indexOf(NEWLINE);
      if (i < 0) {
        this.chunks.push(chunk);
        this.length += chunk.length;
        return;
      }
      this.chunks.push(chunk.subarray(0, i));
      this.length += i;
      chunk = chunk.subarray(i + 1);
      this.line(this.take());
    }
  }

  take() {
    const b = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.length);
    this.chunks = [];
    this.length = 0;
    return b;
  }

  line(buf) {
    let msg;
    try {
      if (buf.length > constants.MAX_STRING_LENGTH) throw new Error(`a line of ${buf.length} bytes is longer than the longest string this JavaScript engine holds`);
      msg = JSON.parse(buf.toString('utf8'));
    } catch (err) {
      this.onBadLine(buf, err);
      return;
    }
    const object = msg !== null && typeof msg === 'object';
    let fds = [];
    if (this.descriptors && object && msg.fds !== undefined) {
      // The line's descriptors came with its bytes, so by its last byte they are all in.
      const k = msg.fds;
      if (!Number.isSafeInteger(k) || k < 0) return this.break(new Error(`a line whose "fds" is not a non-negative integer: ${buf.subarray(0, 80)}`));
      if (k > this.fds.length) return this.break(new Error(`a line announcing ${k} descriptors came with ${this.fds.length}`));
      fds = this.fds.splice(0, k);
    }
    const n = this.rawBytes && object ? msg.bytes : undefined;
    if (Number.isSafeInteger(n) && n > 0) {
      this.head = msg;
      this.headFds = fds;
      this.want = n;
    } else {
      this.onMessage(msg, null, fds);
    }
  }

  break(err) {
    this.broken = true;
    this.chunks = [];
    this.length = 0;
    this.onBroken(err);
  }
}

module.exports = { MessageReader };
