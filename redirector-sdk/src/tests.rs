//! The SDK replays the shared transcripts (redirector-hook/transcripts): it must write every
//! line the transcripts say an application writes, byte for byte after the line's JSON.

use std::{
    io::BufRead as _,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
};

use redirector_hook::transcript::{self, Fixture, Step, Transcript, same_line};
use serde_json::Value;

use super::*;

struct App(Mutex<Fixture>);

impl Sessions for App {
    fn export(&self, handoff: &str, clients: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
        self.0.lock().unwrap().export(handoff, clients)
    }
    fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
        self.0.lock().unwrap().import(handoff, sessions);
        Ok(())
    }
    fn commit(&self, handoff: &str) {
        self.0.lock().unwrap().commit(handoff);
    }
    fn abort(&self, handoff: &str) {
        self.0.lock().unwrap().abort(handoff);
    }
}

/// Takes the first message the application wrote out of `out`: its line and raw bytes.
fn next_written(out: &mut Vec<u8>, version: Version) -> (Value, Vec<u8>) {
    let end = out.iter().position(|b| *b == b'\n').expect("the application wrote a whole line");
    let line: Vec<u8> = out.drain(..=end).collect();
    let head = frame::Head::parse(&line[..end]).expect("a JSON object");
    let n = if version > Version::V1 { usize::try_from(head.bytes).unwrap() } else { 0 };
    assert!(out.len() >= n, "{n} raw bytes announced, {} written", out.len());
    let raw = out.drain(..n).collect();
    (serde_json::from_slice(&line[..end]).unwrap(), raw)
}

fn replay(t: &Transcript) {
    let Some(Step::App { msg: reg, .. }) = t.steps.iter().find(|s| matches!(s, Step::App { .. })) else { panic!("{}: no register line", t.name) };
    let service: SocketAddr = reg["service"].as_str().unwrap().parse().unwrap();
    let version = Version::from_number(reg["version"].as_u64().unwrap()).unwrap();
    let app = App(Mutex::new(Fixture::default()));
    let unfinished = Mutex::new(Unfinished::new());
    let (mut out, mut registering, mut first_state) = (Vec::new(), true, true);
    for (i, step) in t.steps.iter().enumerate() {
        let at = format!("{} step {}", t.name, i + 1);
        match step {
            Step::State(s) if first_state => *app.0.lock().unwrap() = Fixture::new(s),
            Step::State(s) => assert_eq!(&app.0.lock().unwrap().state(), s, "{at}: the application's sessions"),
            Step::Agent { msg, raw } => {
                let line = serde_json::to_vec(msg).unwrap();
                let r = handle(&app, &unfinished, version, &line, raw, &mut out);
                // An error line ends the connection; anything else is answered.
                assert_eq!(r.is_err(), msg["op"] == "error", "{at}: {r:?}");
            }
            Step::App { msg, raw } => {
                let (got, got_raw) = if registering {
                    registering = false;
                    (serde_json::from_str(&register_line(service, version, &unfinished.lock().unwrap())).unwrap(), Vec::new())
                } else {
                    next_written(&mut out, version)
                };
                same_line(msg, &got).unwrap_or_else(|e| panic!("{at}: {e}"));
                assert_eq!(String::from_utf8_lossy(&got_raw), String::from_utf8_lossy(raw), "{at}: raw bytes");
            }
            Step::Reconnect => {
                assert!(out.is_empty(), "{at}: the application wrote more than the transcript: {}", String::from_utf8_lossy(&out));
                registering = true;
            }
        }
        first_state &= !matches!(step, Step::State(_));
    }
    assert!(out.is_empty(), "{}: the application wrote more than the transcript: {}", t.name, String::from_utf8_lossy(&out));
}

#[test]
fn the_sdk_writes_what_the_shared_transcripts_say() {
    let all = transcript::all();
    assert!(all.len() >= 4, "transcripts found: {}", all.len());
    for t in &all {
        replay(t);
    }
}

#[test]
fn an_error_from_the_agent_ends_the_connection() {
    let (s, u) = (App(Mutex::default()), Mutex::new(Unfinished::new()));
    let mut out = Vec::new();
    assert!(handle(&s, &u, Version::V2, br#"{"op":"error","error":"replaced"}"#, b"", &mut out).is_err());
    assert!(handle(&s, &u, Version::V2, br#"{"op":"registered","service":"x","version":2}"#, b"", &mut out).is_ok() && out.is_empty());
    handle(&s, &u, Version::V2, br#"{"noise":1}"#, b"", &mut out).unwrap();
    assert!(out.is_empty(), "a line without an id is not answered");
}

/// An import as the application got it: its hand-over and its sessions.
type Imported = (String, Vec<(IpAddr, Vec<u8>)>);

/// Records what it imports.
#[derive(Default)]
struct Importer(Mutex<Vec<Imported>>);

impl Sessions for Importer {
    fn export(&self, _: &str, _: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
        Vec::new()
    }
    fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
        self.0.lock().unwrap().push((handoff.to_string(), sessions));
        Ok(())
    }
    fn commit(&self, _: &str) {}
    fn abort(&self, _: &str) {}
}

/// Over a real socket, an import's blobs reach the application each as its own buffer,
/// whatever pieces they arrive in; an import whose lengths do not add up is refused and the
/// connection stays framed.
#[test]
fn imported_blobs_arrive_whole_over_the_socket() {
    use std::os::unix::net::UnixListener;
    let dir = std::env::temp_dir().join(format!("redirector-sdk-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("hook.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    let app = Arc::new(Importer::default());
    let hook = Hook::start_version(&sock, "198.18.0.10:80".parse().unwrap(), Some(Version::V2), app.clone());
    let (conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"register\""), "{line}");
    w.write_all(b"{\"op\":\"registered\",\"service\":\"198.18.0.10:80\",\"version\":2}\n").unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut msg = format!(
        "{{\"id\":1,\"op\":\"import\",\"handoff\":\"a/1/b\",\"bytes\":{},\"sessions\":[{{\"client\":\"198.18.1.5\",\"len\":5}},{{\"client\":\"2001:db8::5\",\"len\":0}},{{\"client\":\"198.18.1.6\",\"len\":{}}}]}}\n",
        5 + big.len(),
        big.len()
    )
    .into_bytes();
    msg.extend_from_slice(b"hello");
    msg.extend_from_slice(&big);
    // Malformed: the lengths add up to 3, the line announces 4 (and 4 follow).
    msg.extend_from_slice(b"{\"id\":2,\"op\":\"import\",\"handoff\":\"a/2/b\",\"bytes\":4,\"sessions\":[{\"client\":\"198.18.1.7\",\"len\":3}]}\nwxyz");
    msg.extend_from_slice(b"{\"id\":3,\"op\":\"commit\",\"handoff\":\"a/1/b\"}\n");
    for piece in msg.chunks(7_777) {
        w.write_all(piece).unwrap();
    }
    let mut answers = Vec::new();
    for _ in 0..3 {
        line.clear();
        r.read_line(&mut line).unwrap();
        answers.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    drop(hook);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(answers[0], serde_json::json!({"id":1,"ok":true}));
    assert_eq!(answers[1]["ok"], false);
    assert!(answers[1]["error"].as_str().unwrap().contains("malformed import"), "{}", answers[1]);
    assert_eq!(answers[2], serde_json::json!({"id":3,"ok":true}));
    let got = app.0.lock().unwrap();
    assert_eq!(got.len(), 1, "only the well-formed import reached the application");
    let (handoff, sessions) = &got[0];
    assert_eq!(handoff, "a/1/b");
    let want: Vec<(IpAddr, Vec<u8>)> = vec![("198.18.1.5".parse().unwrap(), b"hello".to_vec()), ("2001:db8::5".parse().unwrap(), Vec::new()), ("198.18.1.6".parse().unwrap(), big)];
    assert!(*sessions == want, "the blobs, each whole and in order");
}

/// A fresh folder for one test's hook socket (tests run side by side in one process).
fn socket_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("redirector-sdk-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fake agent's end of one hook connection: it reads lines and raw bytes with the
/// descriptors that came with them, as the agent does, and writes lines with descriptors.
struct FakeAgent {
    sock: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// The reads that brought descriptors: as many as the messages that carried them.
    reads_with_fds: usize,
}

impl FakeAgent {
    fn accept(l: &std::os::unix::net::UnixListener) -> Self {
        let (sock, _) = l.accept().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self { sock, buf: Vec::new(), fds: VecDeque::new(), reads_with_fds: 0 }
    }

    /// One more read; false at the end of the stream.
    fn fill(&mut self) -> bool {
        let mut b = [0u8; 4096];
        let before = self.fds.len();
        let n = fds::recv_some(self.sock.as_fd(), &mut b, &mut self.fds).expect("the hook wrote within 10 s");
        self.reads_with_fds += usize::from(self.fds.len() > before);
        self.buf.extend_from_slice(&b[..n]);
        n > 0
    }

    fn line(&mut self) -> Value {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return serde_json::from_slice(&line[..end]).unwrap();
            }
            assert!(self.fill(), "the hook closed mid-line: {}", String::from_utf8_lossy(&self.buf));
        }
    }

    fn raw(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill(), "the hook closed in the middle of raw bytes");
        }
        self.buf.drain(..n).collect()
    }

    /// Whether the hook closed this connection (nothing more to read).
    fn closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill()
    }

    /// Sends `line` with `fds` attached to it, then `raw`.
    fn send(&self, line: &Value, raw: &[u8], fds: &[BorrowedFd<'_>]) {
        fds::send_all(self.sock.as_fd(), format!("{line}\n").as_bytes(), fds, fds::ONE_PER_SEND).unwrap();
        (&self.sock).write_all(raw).unwrap();
    }

    /// Reads the register line (checking its version) and accepts it.
    fn register(&mut self, version: u64) -> Value {
        let reg = self.line();
        assert_eq!((reg["op"].as_str(), reg["version"].as_u64()), (Some("register"), Some(version)), "{reg}");
        self.send(&serde_json::json!({"op":"registered","service":reg["service"],"version":version}), b"", &[]);
        reg
    }
}

/// A loopback TCP connection: (the application's end, the client's end).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (server, client)
}

/// Says `what` through `from` and checks `to` reads it.
fn says(from: &TcpStream, to: &TcpStream, what: &[u8]) {
    (&*from).write_all(what).unwrap();
    let mut got = vec![0u8; what.len()];
    (&*to).read_exact(&mut got).unwrap();
    assert_eq!(got, what);
}

/// Hands over its one TCP connection with an export (blob `GET /`), records what it adopts and
/// the order of the calls.
#[derive(Default)]
struct Mover {
    conn: Mutex<Option<TcpStream>>,
    adopted: Mutex<Vec<(String, Connection)>>,
    calls: Mutex<Vec<String>>,
}

impl Sessions for Mover {
    fn export(&self, handoff: &str, clients: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
        self.calls.lock().unwrap().push(format!("export {handoff}"));
        clients.iter().map(|c| (*c, b"count=7".to_vec())).collect()
    }
    fn import(&self, _: &str, _: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
        Ok(())
    }
    fn commit(&self, handoff: &str) {
        self.calls.lock().unwrap().push(format!("commit {handoff}"));
    }
    fn abort(&self, handoff: &str) {
        self.calls.lock().unwrap().push(format!("abort {handoff}"));
    }
    fn connections(&self, handoff: &str, clients: &[IpAddr]) -> Vec<Connection> {
        self.calls.lock().unwrap().push(format!("connections {handoff} {clients:?}"));
        self.conn.lock().unwrap().take().map(|socket| Connection { client: clients[0], socket, blob: b"GET /".to_vec() }).into_iter().collect()
    }
    fn adopt(&self, handoff: &str, connections: Vec<Connection>) {
        self.calls.lock().unwrap().push(format!("adopt {handoff} {}", connections.len()));
        self.adopted.lock().unwrap().extend(connections.into_iter().map(|c| (handoff.to_string(), c)));
    }
}

/// Version 3 over a real socket: an export with `connections:true` hands over the
/// application's idle TCP connection (its descriptor with the answer's line, its blob after
/// the session's), the abort gives it back (`adopt`, then `abort`) and it still carries the
/// same client; an outcome whose connections do not add up is confirmed all the same; a line
/// announcing descriptors that did not come breaks the connection (the hook registers again).
#[test]
fn connections_move_with_an_export_and_come_back_with_its_abort() {
    let dir = socket_dir("connections");
    let sock = dir.join("hook.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (server, client) = tcp_pair();
    let app = Arc::new(Mover { conn: Mutex::new(Some(server)), ..Mover::default() });
    let hook = Hook::start(&sock, "198.18.0.10:80".parse().unwrap(), app.clone());
    let mut agent = FakeAgent::accept(&listener);
    agent.register(3);

    agent.send(&serde_json::json!({"id":1,"op":"export","handoff":"a/1/b","clients":["127.0.0.1","198.18.1.9"],"connections":true}), b"", &[]);
    let a = agent.line();
    assert_eq!(
        a,
        serde_json::json!({"id":1,"ok":true,"bytes":19,"fds":1,
            "sessions":[{"client":"127.0.0.1","len":7},{"client":"198.18.1.9","len":7}],
            "connections":[{"client":"127.0.0.1","len":5}]})
    );
    assert_eq!(agent.raw(19), b"count=7count=7GET /", "the sessions' blobs, then the connection's");
    let moved = TcpStream::from(fds::take(&mut agent.fds, 1).unwrap().remove(0));
    assert!(agent.fds.is_empty(), "one descriptor, with the line that announced it");
    assert_eq!(moved.peer_addr().unwrap(), client.local_addr().unwrap(), "the client's connection");
    says(&moved, &client, b"through the agent's copy");

    // The abort gives it back (the agent then closes its copy).
    let back = serde_json::json!({"id":2,"op":"abort","handoff":"a/1/b","bytes":5,"fds":1,"connections":[{"client":"127.0.0.1","len":5}]});
    agent.send(&back, b"GET /", &[moved.as_fd()]);
    drop(moved);
    assert_eq!(agent.line(), serde_json::json!({"id":2,"ok":true}));
    assert_eq!(*app.calls.lock().unwrap(), ["export a/1/b", "connections a/1/b [127.0.0.1, 198.18.1.9]", "adopt a/1/b 1", "abort a/1/b"]);
    {
        let adopted = app.adopted.lock().unwrap();
        let (handoff, c) = &adopted[0];
        assert_eq!((handoff.as_str(), c.client, c.blob.as_slice()), ("a/1/b", IpAddr::from([127, 0, 0, 1]), &b"GET /"[..]));
        c.socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        says(&client, &c.socket, b"ping");
        says(&c.socket, &client, b"pong");
    }

    // Connections that do not add up (one listed, no descriptor): closed, the commit confirmed.
    agent.send(&serde_json::json!({"id":3,"op":"commit","handoff":"c/3/a","connections":[{"client":"127.0.0.1","len":0}]}), b"", &[]);
    assert_eq!(agent.line(), serde_json::json!({"id":3,"ok":true}));
    assert_eq!(app.calls.lock().unwrap().last().unwrap(), "commit c/3/a", "no adopt");

    // A line announcing a descriptor that did not come: the stream cannot be trusted.
    agent.send(&serde_json::json!({"id":4,"op":"commit","handoff":"c/4/a","fds":1,"connections":[{"client":"127.0.0.1","len":0}]}), b"", &[]);
    assert!(agent.closed(), "the hook closed the connection");
    let mut again = FakeAgent::accept(&listener);
    again.register(3);
    drop(hook);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!app.calls.lock().unwrap().iter().any(|c| c.contains("c/4/a")), "nothing applied of the broken line");
}

/// An application that leaves `connections` and `adopt` as they are answers a version 3
/// export as in version 2, and the connections that come to it are closed.
#[test]
fn an_application_that_moves_no_connection_answers_as_in_version_2() {
    let dir = socket_dir("no-connections");
    let sock = dir.join("hook.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let hook = Hook::start(&sock, "198.18.0.10:80".parse().unwrap(), Arc::new(Importer::default()));
    let mut agent = FakeAgent::accept(&listener);
    agent.register(3);
    agent.send(&serde_json::json!({"id":1,"op":"export","handoff":"a/1/b","clients":["198.18.1.5"],"connections":true}), b"", &[]);
    assert_eq!(agent.line(), serde_json::json!({"id":1,"ok":true,"sessions":[]}));
    let (server, client) = tcp_pair();
    agent.send(&serde_json::json!({"id":2,"op":"commit","handoff":"c/2/a","bytes":2,"fds":1,"connections":[{"client":"127.0.0.1","len":2}]}), b"xy", &[server.as_fd()]);
    drop(server);
    assert_eq!(agent.line(), serde_json::json!({"id":2,"ok":true}));
    let mut b = [0u8; 1];
    assert_eq!((&client).read(&mut b).unwrap(), 0, "the connection was closed");
    drop(hook);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Hands over every connection it holds with an export.
struct ManyConns(Mutex<Vec<TcpStream>>);

impl Sessions for ManyConns {
    fn export(&self, _: &str, _: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
        Vec::new()
    }
    fn import(&self, _: &str, _: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
        Ok(())
    }
    fn commit(&self, _: &str) {}
    fn abort(&self, _: &str) {}
    fn connections(&self, _: &str, clients: &[IpAddr]) -> Vec<Connection> {
        self.0.lock().unwrap().drain(..).map(|socket| Connection { client: clients[0], socket, blob: Vec::new() }).collect()
    }
}

/// Many connections handed over with one export go to the agent as many to a `sendmsg` as a
/// message holds, not one each (a thousand took 26 ms one at a time): 300 in two messages,
/// each the client's connection, in the order listed.
#[test]
fn many_connections_go_to_the_agent_in_few_messages() {
    let dir = socket_dir("many-connections");
    let sock = dir.join("hook.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (clients, servers): (Vec<TcpStream>, Vec<TcpStream>) = (0..300).map(|_| (TcpStream::connect(l.local_addr().unwrap()).unwrap(), l.accept().unwrap().0)).unzip();
    let app = Arc::new(ManyConns(Mutex::new(servers)));
    let hook = Hook::start(&sock, "198.18.0.10:80".parse().unwrap(), app);
    let mut agent = FakeAgent::accept(&listener);
    agent.register(3);
    agent.send(&serde_json::json!({"id":1,"op":"export","handoff":"a/1/b","clients":["127.0.0.1"],"connections":true}), b"", &[]);
    let a = agent.line();
    assert_eq!((a["fds"].as_u64(), a["connections"].as_array().map(Vec::len)), (Some(300), Some(300)), "{a}");
    let moved = fds::take(&mut agent.fds, 300).unwrap();
    assert_eq!(agent.reads_with_fds, 2, "300 descriptors in messages of at most {}", fds::MAX_PER_MESSAGE);
    let mut peers: Vec<SocketAddr> = moved.into_iter().map(|fd| TcpStream::from(fd).peer_addr().unwrap()).collect();
    let mut want: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    peers.sort();
    want.sort();
    assert_eq!(peers, want, "each client's connection, once");
    drop(hook);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An agent that refuses version 3 gets version 2, and one that refuses 2 gets 1: one version
/// older at a time.
#[test]
fn the_hook_falls_back_one_version_at_a_time() {
    let dir = socket_dir("fallback");
    let sock = dir.join("hook.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let hook = Hook::start(&sock, "198.18.0.10:80".parse().unwrap(), Arc::new(Importer::default()));
    for (offered, refusal) in [(3, "this agent speaks hook protocol versions 1 and 2, not 3"), (2, "this agent speaks hook protocol version 1, not 2")] {
        let mut agent = FakeAgent::accept(&listener);
        let reg = agent.line();
        assert_eq!(reg["version"], offered, "{reg}");
        agent.send(&serde_json::json!({"op":"error","error":refusal}), b"", &[]);
    }
    let mut agent = FakeAgent::accept(&listener);
    agent.register(1);
    agent.send(&serde_json::json!({"id":1,"op":"export","handoff":"a/1/b","clients":["198.18.1.5"]}), b"", &[]);
    assert_eq!(agent.line(), serde_json::json!({"id":1,"ok":true,"sessions":[]}));
    drop(hook);
    let _ = std::fs::remove_dir_all(&dir);
}
