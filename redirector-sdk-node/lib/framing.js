'use strict';
// Reading the hook's messages from a byte stream: JSON lines of any size, each followed (in
// version 2) by the `bytes` raw bytes its line announces. Chunks are kept as they arrive and
// joined once per message, so a line or a blob of hundreds of MiB costs one copy, not one
// per chunk.

const { constants } = require('buffer');

const NEWLINE = 0x0a;

/**
 * Splits a stream into messages, calling back synchronously and in order:
 * `onMessage(msg, raw)` for a JSON line (`raw`: a Buffer of the bytes that followed it, or
 * null), `onBadLine(line, err)` for a line that is not JSON (nothing follows it).
 * Set `rawBytes` once the connection speaks version 2: from the next line on, a top-level
 * `"bytes": N` makes the reader take N raw bytes after the line.
 */
class MessageReader {
  constructor(onMessage, onBadLine) {
    this.onMessage = onMessage;
    this.onBadLine = onBadLine;
    this.rawBytes = false;
    this.chunks = [];
    this.length = 0; // bytes in `chunks`
    this.head = null; // a parsed line waiting for its raw bytes
    this.want = 0; // how many raw bytes `head` waits for
  }

  /** Takes the next chunk of the stream. */
  push(chunk) {
    while (chunk.length > 0) {
      if (this.head) {
        const take = Math.min(this.want - this.length, chunk.length);
        this.chunks.push(chunk.subarray(0, take));
        this.length += take;
        chunk = chunk.subarray(take);
        if (this.length === this.want) {
          const [head, raw] = [this.head, this.take()];
          this.head = null;
          this.onMessage(head, raw);
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
    const n = this.rawBytes && msg !== null && typeof msg === 'object' ? msg.bytes : undefined;
    if (Number.isSafeInteger(n) && n > 0) {
      this.head = msg;
      this.want = n;
    } else {
      this.onMessage(msg, null);
    }
  }
}

module.exports = { MessageReader };
