//! Sessions move with their clients: the demo HTTP application on three servers with agents,
//! 200 clients in keep-alive loops driving A over its watermark. Also: the test client's one
//! retry (only on a connection closed before any response byte), and the hook socket's mode
//! and owner.

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener},
    os::unix::fs::MetadataExt as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redirector_tests::{
    Topology,
    agents::{Cluster, DemoApp, Options, migrated, wait_status},
    http::HttpClient,
    in_netns,
    net::{SERVICE4, client4},
    require_root,
};

#[test]
fn two_hundred_clients_keep_their_sessions_with_zero_failed_requests() {
    if require_root() {
        zero_failed_requests(DemoApp::Rust);
    }
}

#[test]
fn the_node_js_demo_passes_the_same_test() {
    if require_root() {
        zero_failed_requests(DemoApp::Node);
    }
}

/// 200 clients in keep-alive loops drive A over its watermark; A sheds about half to B and C.
/// Over the whole run: every request answered, and every client's counter goes 1, 2, 3...
/// (one per request, no gap or repeat), with its history and its own address, across the
/// move.
fn zero_failed_requests(kind: DemoApp) {
    let c = Cluster::with_demo_app(kind, 200, &[("a", 150, 100), ("b", 70, 50), ("c", 70, 50)]);
    let dst = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let ns = c.t.client.ns.clone();
    // 200 clients, 20 threads of 10; each client loops on its keep-alive connection. Bounded:
    // at most 8 s and 400 requests per client.
    let results = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(8);
    let threads: Vec<_> = (0..20u16)
        .map(|t| {
            let (ns, results) = (ns.clone(), results.clone());
            std::thread::spawn(move || {
                let mut clients: Vec<HttpClient> = (1..=10).map(|i| HttpClient::new(&ns, IpAddr::V4(client4(t * 10 + i)), dst)).collect();
                let mut rounds = 0;
                while Instant::now() < deadline && rounds < 400 {
                    for cl in &mut clients {
                        cl.request();
                    }
                    rounds += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                results.lock().expect("lock").extend(clients);
            })
        })
        .collect();
    wait_status(&c.sock("a"), 20, "A to shed clients to B and C", |v| v["migrated_out"].as_array().is_some_and(|m| m.len() >= 50));
    for t in threads {
        t.join().expect("client thread");
    }
    let clients = results.lock().expect("lock");
    let total: u64 = clients.iter().map(|c| c.requests).sum();
    let broken: Vec<String> = clients.iter().filter(|c| !c.intact()).map(HttpClient::problems).collect();
    if !broken.is_empty() {
        for a in &c.apps {
            eprintln!("--- {} ---\n{}", a.log.display(), a.log());
        }
    }
    assert!(
        broken.is_empty(),
        "{} of 200 clients lost a request or broke their session ({total} requests):\n{}",
        broken.len(),
        broken.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    for cl in clients.iter() {
        assert!(cl.requests >= 100, "{} made {} requests: the run was too short to mean anything", cl.src, cl.requests);
    }
    // Where each client's session went, by A's own account and by the answers.
    let a = c.status("a");
    let moved_to: BTreeMap<String, String> = migrated(&a).into_iter().collect();
    let by: HashMap<&str, usize> = clients.iter().fold(HashMap::new(), |mut m, c| {
        for s in c.servers.keys() {
            *m.entry(s.as_str()).or_default() += 1;
        }
        m
    });
    for cl in clients.iter() {
        let others: Vec<&String> = cl.servers.keys().filter(|s| *s != "A").collect();
        match moved_to.get(&cl.src.to_string()) {
            Some(to) => assert_eq!(others, vec![&to.to_uppercase()], "{} moved to {to}: its later requests were served there, and only there", cl.src),
            None => assert!(others.is_empty(), "{} never moved but was served by {others:?}", cl.src),
        }
    }
    let moved = moved_to.len();
    assert!(by.contains_key("B") && by.contains_key("C"), "both volunteers took clients (B and C have room for 70 each, 100 must move): {by:?}");
    assert!((70..=130).contains(&moved), "about half of the 200 clients moved (A sheds down to its low watermark, 100): {moved} moved; by server {by:?}; A said {a}");
    let retries: u64 = clients.iter().map(|c| c.retries).sum();
    eprintln!("{total} requests, 0 failed, 0 broken sessions, {retries} retried once; {moved} clients moved; clients per server {by:?}");
}

/// What the scripted server does with one request.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Answers 200 with the next count.
    Answer,
    /// Closes the connection without a byte.
    Close,
    /// Resets the connection without a byte.
    Reset,
    /// Sends the status line, then closes.
    Half,
    /// Answers 503.
    Unavailable,
}

/// A server on A's service address that plays `steps`, one per request, in order; returns
/// the number of connections it accepted when the steps run out.
fn scripted(t: &Topology, steps: Vec<Step>) -> std::thread::JoinHandle<usize> {
    let addr = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let listener = in_netns(&t.a.ns, move || TcpListener::bind(addr).expect("bind"));
    std::thread::spawn(move || {
        let (mut accepted, mut count) = (0, 0u64);
        let mut steps = steps.into_iter().peekable();
        'conns: loop {
            if steps.peek().is_none() {
                return accepted;
            }
            let (conn, peer) = listener.accept().expect("accept");
            accepted += 1;
            let mut w = conn.try_clone().expect("clone");
            let mut r = BufReader::new(conn);
            loop {
                let mut line = String::new();
                // The request head.
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        continue 'conns;
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let Some(step) = steps.next() else { return accepted };
                match step {
                    Step::Answer => {
                        count += 1;
                        let history: Vec<u64> = (count.saturating_sub(4).max(1)..=count).collect();
                        let body = serde_json::json!({"server": "A", "client": peer.ip().to_string(), "count": count, "history": history}).to_string();
                        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    }
                    Step::Close => continue 'conns,
                    Step::Reset => {
                        let _ = nix::sys::socket::setsockopt(&w, nix::sys::socket::sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 });
                        continue 'conns;
                    }
                    Step::Half => {
                        let _ = w.write_all(b"HTTP/1.1 200 OK\r\n");
                        continue 'conns;
                    }
                    Step::Unavailable => {
                        let _ = w.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
                    }
                }
            }
        }
    })
}

/// The test client retries a request once, on a new connection, only when the connection
/// closed (or was reset) before any byte of a response, as browsers do: never after part of
/// a response, never on an error answer, never twice.
#[test]
fn the_test_client_retries_once_and_only_when_nothing_was_answered() {
    if !require_root() {
        return;
    }
    let t = Topology::new(1);
    let dst = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let src = IpAddr::V4(client4(1));
    // 1: answered; 2: its connection closes before any byte, the retry is answered; 3: reset
    // before any byte, retried; 4: answered on the same connection.
    let server = scripted(&t, vec![Step::Answer, Step::Close, Step::Answer, Step::Reset, Step::Answer, Step::Answer]);
    let mut cl = HttpClient::new(&t.client.ns, src, dst);
    for _ in 0..4 {
        cl.request();
    }
    assert!(cl.intact(), "closed or reset before any byte: retried and answered: {}", cl.problems());
    assert_eq!((cl.retries, cl.last), (2, Some(4)));
    drop(cl);
    assert_eq!(server.join().expect("server"), 3, "one new connection per retry");
    // Part of a response, then a close: failed, not retried.
    let server = scripted(&t, vec![Step::Half]);
    let mut cl = HttpClient::new(&t.client.ns, src, dst);
    cl.request();
    assert_eq!((cl.failures.len(), cl.retries), (1, 0), "{:?}", cl.failures);
    assert!(cl.failures[0].contains("mid-response"), "{:?}", cl.failures);
    drop(cl);
    assert_eq!(server.join().expect("server"), 1);
    // Closed before any byte twice: one retry, then it fails.
    let server = scripted(&t, vec![Step::Close, Step::Close]);
    let mut cl = HttpClient::new(&t.client.ns, src, dst);
    cl.request();
    assert_eq!((cl.failures.len(), cl.retries), (1, 1), "{:?}", cl.failures);
    assert!(cl.failures[0].contains("retry"), "{:?}", cl.failures);
    assert_eq!(server.join().expect("server"), 2, "one retry");
    // An error answer is an answer: not retried.
    let server = scripted(&t, vec![Step::Unavailable]);
    let mut cl = HttpClient::new(&t.client.ns, src, dst);
    cl.request();
    assert_eq!((cl.failures.len(), cl.retries), (1, 0), "{:?}", cl.failures);
    assert!(cl.failures[0].contains("503"), "{:?}", cl.failures);
    drop(cl);
    assert_eq!(server.join().expect("server"), 1);
}

/// The hook socket has mode 0660 and the configured owner (from the moment it appears: it is
/// set up in a private folder, then renamed into place).
#[test]
fn the_hook_socket_has_its_mode_and_owner() {
    if !require_root() {
        return;
    }
    let c = Cluster::with_options(2, &[("a", 100, 50), ("b", 100, 50)], &Options { extra: "app_socket_owner = \"4242:4343\"\n".into(), ..Options::default() });
    for n in ["a", "b"] {
        let m = std::fs::metadata(c.dir.join(format!("{n}-app.sock"))).expect("hook socket");
        assert_eq!(m.mode() & 0o7777, 0o660, "{n}'s hook socket mode");
        assert_eq!((m.uid(), m.gid()), (4242, 4343), "{n}'s hook socket owner");
        let admin = std::fs::metadata(c.sock(n)).expect("admin socket");
        assert_eq!(admin.mode() & 0o7777, 0o600, "{n}'s admin socket mode");
    }
    let left: Vec<String> = std::fs::read_dir(&c.dir).expect("dir").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
    assert!(left.is_empty(), "no temporary folder left behind: {left:?}");
}
