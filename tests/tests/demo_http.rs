//! The demo applications (Rust and Node.js) as HTTP servers, without agents: a connection
//! stays open or closes as RFC 9112 section 9.3 says (HTTP/1.0 closes unless kept alive,
//! HTTP/1.1 persists unless the client says `Connection: close`), the response says which,
//! the server closes first when it closes (its side goes to TIME_WAIT), and with
//! `--idle-close-ms` it closes idle connections itself.

use std::{
    io::{BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use redirector_tests::{
    Host, Topology,
    agents::{Cgroups, DemoApp, Proc, start_demo_app},
    app::connect_tcp,
    http::{ReadError, Response, expect_close, read_response},
    io::Patient,
    net::{SERVICE4, SERVICE4_B, client4},
    require_root,
};

/// Both demo applications, each on its own server: Rust on A, Node.js on B. No agent: their
/// hook retries connecting to a socket nobody serves, which changes nothing here.
struct Demos {
    apps: Vec<(DemoApp, SocketAddr, Proc)>,
    /// Kept for its guard: the applications' cgroups go when it drops.
    _cgroups: Cgroups,
    dir: PathBuf,
    t: Topology,
}

impl Demos {
    fn start(args: &[&str]) -> Self {
        let t = Topology::new(1);
        let cgroups = Cgroups::new(&t.prefix);
        let dir = std::env::temp_dir().join(format!("{}-demos", t.prefix));
        std::fs::create_dir_all(&dir).expect("demos dir");
        let args: Vec<String> = args.iter().map(ToString::to_string).collect();
        let apps = [(DemoApp::Rust, &t.a, SERVICE4, "A"), (DemoApp::Node, &t.b, SERVICE4_B, "B")]
            .into_iter()
            .map(|(kind, host, ip, name)| {
                let addr = SocketAddr::new(IpAddr::V4(ip), 80);
                let cgroup = cgroups.group(&format!("{}-{name}", t.prefix));
                (kind, addr, start_demo_app(kind, host, &cgroup, name, addr, &dir.join("nobody.sock"), &dir, &args))
            })
            .collect();
        Self { apps, _cgroups: cgroups, dir, t }
    }

    fn host(&self, kind: DemoApp) -> &Host {
        if kind == DemoApp::Rust { &self.t.a } else { &self.t.b }
    }

    /// A connection of the client to `addr`, waiting at most `timeout` for each read.
    fn connect(&self, addr: SocketAddr, timeout: Duration) -> Conn {
        let s = connect_tcp(&self.t.client.ns, IpAddr::V4(client4(1)), addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.set_read_timeout(Some(timeout)).expect("read timeout");
        let r = BufReader::new(Patient(s.try_clone().expect("clone")));
        Conn { s, r }
    }
}

impl Drop for Demos {
    fn drop(&mut self) {
        for (_, _, p) in &mut self.apps {
            p.kill();
        }
        if std::thread::panicking() {
            for (kind, _, p) in &self.apps {
                eprintln!("--- {kind:?} demo's log ---\n{}", p.log());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // Then the fields: the cgroups, the topology.
    }
}

struct Conn {
    s: TcpStream,
    r: BufReader<Patient<TcpStream>>,
}

impl Conn {
    /// Sends `request` and reads the answer, which must be a 200 with a session count.
    fn ask(&mut self, what: &str, request: &str) -> (Response, u64) {
        self.s.write_all(request.as_bytes()).unwrap_or_else(|e| panic!("{what}: sending the request: {e}"));
        let resp = read_response(&mut self.r).unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        assert!(resp.status.starts_with("HTTP/1.1 200 "), "{what}: answered {resp:?}");
        let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_else(|e| panic!("{what}: bad body {resp:?}: {e}"));
        (resp.clone(), v["count"].as_u64().unwrap_or_else(|| panic!("{what}: no count in {v}")))
    }

    /// Asserts the server closes the connection (within the read timeout) while the client
    /// keeps it open; then the client closes its side, and the server's side must be left in
    /// TIME_WAIT (the server closed first). Returns when the server's close arrived.
    fn assert_closed_by_server(self, what: &str, server: &Host, addr: SocketAddr) -> Instant {
        let mut r = self.r;
        expect_close(&mut r).unwrap_or_else(|e| panic!("{what}: the server did not close the connection: {e}"));
        let closed = Instant::now();
        let client = self.s.local_addr().expect("local address");
        drop((self.s, r));
        // The server's side goes FIN_WAIT_2 -> TIME_WAIT when the client's FIN arrives.
        let start = Instant::now();
        loop {
            let tw = server.exec(&["ss", "-Htn", "state", "time-wait"]);
            let found = tw.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.contains(&addr.to_string().as_str()) && f.contains(&client.to_string().as_str())
            });
            if found {
                return closed;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "{what}: the server's side of {client} -> {addr} is not in TIME_WAIT (so it did not close first):\n{tw}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asserts the connection is still open after `wait` (nothing, not even an end, arrives).
    fn assert_open(&mut self, what: &str, wait: Duration) {
        self.s.set_read_timeout(Some(wait)).expect("read timeout");
        match expect_close(&mut self.r) {
            Err(ReadError::TimedOut(_)) => {}
            other => panic!("{what}: the connection should stay open, got {other:?}"),
        }
    }
}

/// Generous for a loaded two-core machine: an answer or a close that is due comes well
/// within it.
const DUE: Duration = Duration::from_secs(5);

/// HTTP/1.0 without `Connection: keep-alive`: answered with `Connection: close`, and the server
/// closes the connection first (ApacheBench waits for that). With `keep-alive`: the connection
/// stays open for the next request.
#[test]
fn http_1_0_connections_close_after_the_answer_unless_kept_alive() {
    if !require_root() {
        return;
    }
    let d = Demos::start(&[]);
    for (kind, addr, _) in &d.apps {
        let what = format!("{kind:?} demo, HTTP/1.0");
        let mut c = d.connect(*addr, DUE);
        let (resp, count) = c.ask(&what, "GET / HTTP/1.0\r\nHost: demo\r\n\r\n");
        assert_eq!((resp.header("connection"), count), (Some("close"), 1), "{what}: {resp:?}");
        c.assert_closed_by_server(&what, d.host(*kind), *addr);

        let what = format!("{kind:?} demo, HTTP/1.0 with Connection: keep-alive");
        let mut c = d.connect(*addr, DUE);
        let req = "GET / HTTP/1.0\r\nHost: demo\r\nConnection: keep-alive\r\n\r\n";
        let (resp, count) = c.ask(&what, req);
        assert_eq!((resp.header("connection"), count), (Some("keep-alive"), 2), "{what}: {resp:?}");
        let (resp, count) = c.ask(&format!("{what}, the next request on the same connection"), req);
        assert_eq!((resp.header("connection"), count), (Some("keep-alive"), 3), "{what}: {resp:?}");
    }
}

/// HTTP/1.1: a plain connection stays open for the next requests (also after a pause); one
/// with `Connection: close` (any case, in a list) is answered with `Connection: close`, and the
/// server closes it first.
#[test]
fn http_1_1_connections_stay_open_unless_the_client_asks_to_close() {
    if !require_root() {
        return;
    }
    let d = Demos::start(&[]);
    for (kind, addr, _) in &d.apps {
        let what = format!("{kind:?} demo, HTTP/1.1 keep-alive");
        let mut c = d.connect(*addr, DUE);
        for n in 1..=3 {
            let (resp, count) = c.ask(&format!("{what}, request {n}"), "GET / HTTP/1.1\r\nHost: demo\r\n\r\n");
            assert!(!resp.closes(), "{what}: {resp:?}");
            assert_eq!(count, n, "{what}: one session, counted once per request");
        }
        c.assert_open(&what, Duration::from_secs(1));
        let (_, count) = c.ask(&format!("{what}, after a pause"), "GET / HTTP/1.1\r\nHost: demo\r\n\r\n");
        assert_eq!(count, 4, "{what}");

        for header in ["close", "Keep-Alive, Close"] {
            let what = format!("{kind:?} demo, HTTP/1.1 with Connection: {header}");
            let mut c = d.connect(*addr, DUE);
            let (resp, _) = c.ask(&what, &format!("GET / HTTP/1.1\r\nHost: demo\r\nConnection: {header}\r\n\r\n"));
            assert_eq!(resp.header("connection"), Some("close"), "{what}: {resp:?}");
            c.assert_closed_by_server(&what, d.host(*kind), *addr);
        }
    }
}

/// With `--idle-close-ms`, the server closes first a connection idle that long, after its
/// last answer or from when it opened; a connection in use is not closed.
#[test]
fn idle_connections_are_closed_by_the_server_after_idle_close_ms() {
    if !require_root() {
        return;
    }
    const IDLE: Duration = Duration::from_millis(600);
    let d = Demos::start(&["--idle-close-ms", "600"]);
    for (kind, addr, _) in &d.apps {
        // Requests closer together than the idle time keep the connection.
        let what = format!("{kind:?} demo, --idle-close-ms 600");
        let mut c = d.connect(*addr, DUE);
        for n in 1..=4 {
            let (resp, count) = c.ask(&format!("{what}, request {n}"), "GET / HTTP/1.1\r\nHost: demo\r\n\r\n");
            assert!(!resp.closes(), "{what}: {resp:?}");
            assert_eq!(count, n, "{what}: all on one connection, counted once each");
            std::thread::sleep(IDLE / 3);
        }
        // Then idle: closed by the server about IDLE after the last answer (the sleep above
        // included), not before; within the read timeout, IDLE + DUE.
        let answered = Instant::now().checked_sub(IDLE / 3).expect("an instant in the past");
        c.s.set_read_timeout(Some(IDLE + DUE)).expect("read timeout");
        let after = c.assert_closed_by_server(&format!("{what}, idle after an answer"), d.host(*kind), *addr) - answered;
        assert!(after >= IDLE.mul_f64(0.9), "{what}: closed {after:?} after the last answer, before the idle time");

        // A connection that never sends a request.
        let opened = Instant::now();
        let c = d.connect(*addr, IDLE + DUE);
        let after = c.assert_closed_by_server(&format!("{what}, no request"), d.host(*kind), *addr) - opened;
        assert!(after >= IDLE.mul_f64(0.9), "{what}: closed {after:?} after opening, before the idle time");
    }
}
