#!/usr/bin/env python3
"""A fake redirector agent that passes descriptors (SCM_RIGHTS) on its hook socket, as the real
one does in version 3 of the hook protocol (docs/app-protocol.md section 2b), which Node.js
cannot do with its public API. test/fd-agent.js drives it: one JSON command per line on stdin,
one JSON reply per line on stdout. Not a test itself.

    python3 fd-agent.py SOCKET_PATH

Commands (`cmd`), each answered `{"ok": true, ...}` or `{"error": "..."}`:
  accept            wait for the application's (next) connection; with `app` (a name), that
                    application's: several may be connected at once, each under its name (the
                    default one has none); a name connected already is closed first
  read              the application's next message: {"msg", "raw" (text, or null), "fds": [ids]}
                    (its descriptors are held under new ids); {"eof": true} if it closed
  send              a line `msg`, with the held sockets `fds` attached to its bytes, at most
                    `per_send` (default 1) to one sendmsg, then `raw` (text) if any
                    (read and send: of application `app`, if given)
  pair              a loopback TCP connection: {"client": id, "server": id}, both held
  write             write `data` (text) to held socket `fd`
  recv              read `n` bytes of held socket `fd`: {"data", "eof"} (stops at the end)
  name              {"local": [host, port], "peer": [host, port]} of held socket `fd`
  close             close held socket `fd`
"""

import array
import json
import os
import socket
import sys
from collections import deque

WAIT = 5.0
MAX_PER_SEND = 253


class App:
    """One application's connection: what was read of it and not yet given to a message, and
    the descriptors received with it and not yet given to a line."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.fds = deque()

    def recv_some(self):
        data, anc, flags, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_PER_SEND * 4))
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array('i')
                a.frombytes(blob[: len(blob) - len(blob) % a.itemsize])
                self.fds.extend(a)
        if flags & socket.MSG_CTRUNC:
            raise RuntimeError('descriptors cut short (MSG_CTRUNC)')
        if not data:
            raise EOFError()
        self.buf += data

    def close(self):
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class Agent:
    def __init__(self, path):
        self.path = path
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(8)
        self.srv.settimeout(WAIT)
        self.apps = {}  # name -> App
        self.held = {}
        self.next_id = 0
        self.tcp = None

    def hold(self, s):
        self.next_id += 1
        self.held[self.next_id] = s
        return self.next_id

    # --- the applications' connections -------------------------------------------------------

    def app_of(self, c):
        name = c.get('app', '')
        if name not in self.apps:
            raise RuntimeError(f'no application {name!r} connected')
        return self.apps[name]

    def accept(self, c):
        name = c.get('app', '')
        old = self.apps.pop(name, None)
        if old is not None:
            old.close()
        sock, _ = self.srv.accept()
        sock.settimeout(WAIT)
        self.apps[name] = App(sock)
        return {}

    def read(self, c):
        app = self.app_of(c)
        try:
            while b'\n' not in app.buf:
                app.recv_some()
            i = app.buf.index(b'\n')
            line = bytes(app.buf[:i])
            del app.buf[: i + 1]
            msg = json.loads(line)
            n = msg.get('bytes', 0) if isinstance(msg, dict) else 0
            while len(app.buf) < n:
                app.recv_some()
        except EOFError:
            return {'eof': True}
        raw = bytes(app.buf[:n]) if n else None
        del app.buf[:n]
        k = msg.get('fds', 0) if isinstance(msg, dict) else 0
        if k > len(app.fds):
            raise RuntimeError(f'a line announcing {k} descriptors came with {len(app.fds)}')
        ids = [self.hold(socket.socket(fileno=app.fds.popleft())) for _ in range(k)]
        return {'msg': msg, 'raw': raw.decode('utf-8', 'replace') if raw is not None else None, 'fds': ids}

    def send(self, c):
        app = self.app_of(c).sock
        line = (json.dumps(c['msg'], separators=(',', ':')) + '\n').encode()
        fds = [self.held[i].fileno() for i in c.get('fds', [])]
        per = c.get('per_send', 1)
        # As the agent writes (redirector-hook fds::send_all): each write carrying descriptors
        # leaves one byte for each write the remaining descriptors still need.
        while fds:
            take, fds = fds[:per], fds[per:]
            later = -(-len(fds) // per)
            n = max(1, len(line) - later)
            sent = app.sendmsg([line[:n]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', take).tobytes())])
            line = line[sent:]
        if line:
            app.sendall(line)
        if c.get('raw') is not None:
            app.sendall(c['raw'].encode())
        return {}

    # --- TCP connections ----------------------------------------------------------------------

    def pair(self, _):
        if self.tcp is None:
            self.tcp = socket.socket()
            self.tcp.bind(('127.0.0.1', 0))
            self.tcp.listen(512)
            self.tcp.settimeout(WAIT)
        client = socket.create_connection(self.tcp.getsockname(), timeout=WAIT)
        server, _ = self.tcp.accept()
        return {'client': self.hold(client), 'server': self.hold(server)}

    def write(self, c):
        self.held[c['fd']].sendall(c['data'].encode())
        return {}

    def recv(self, c):
        s = self.held[c['fd']]
        s.settimeout(c.get('ms', WAIT * 1000) / 1000)
        got = bytearray()
        eof = False
        try:
            while len(got) < c['n']:
                d = s.recv(c['n'] - len(got))
                if not d:
                    eof = True
                    break
                got += d
        except socket.timeout:
            pass
        return {'data': got.decode('utf-8', 'replace'), 'eof': eof}

    def name(self, c):
        s = self.held[c['fd']]
        return {'local': list(s.getsockname()[:2]), 'peer': list(s.getpeername()[:2])}

    def close(self, c):
        self.held.pop(c['fd']).close()
        return {}


def main():
    agent = Agent(sys.argv[1])
    print(json.dumps({'ok': True, 'listening': agent.path}), flush=True)
    for line in sys.stdin:
        c = json.loads(line)
        try:
            reply = {'ok': True, **getattr(agent, c['cmd'])(c)}
        except Exception as e:  # reported to the test, which fails with it
            reply = {'error': f'{type(e).__name__}: {e}'}
        print(json.dumps(reply), flush=True)


if __name__ == '__main__':
    main()
