//! Sessions move with their clients: the demo HTTP application on three servers with agents,
//! 200 clients in keep-alive loops driving A over its watermark, or opening a new connection
//! every few requests that the servers close first. Also: the test client's one retry (only on
//! a connection closed before any response byte), and the hook socket's mode and owner.

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
    agents::{Cluster, DemoApp, NodeOpts, Options, migrated, wait_status},
    http::{Churn, HttpClient},
    in_netns,
    net::{SERVICE4, client4},
    require_root,
};

#[test]
fn two_hundred_clients_keep_their_sessions_with_zero_failed_requests() {
    if require_root() {
        zero_failed_requests(DemoApp::Rust, &Load::KEEP_ALIVE);
    }
}

#[test]
fn the_node_js_demo_passes_the_same_test() {
    if require_root() {
        zero_failed_requests(DemoApp::Node, &Load::KEEP_ALIVE);
    }
}

/// The same with a new connection every 5 requests, each ended by the server: the 5th request
/// on a connection asks `Connection: close`, so the server answers and closes first (its side
/// goes to TIME_WAIT, on A also for the connections of clients that move next), and the client
/// opens its next connection at once (one connection per client nearly all the time, as in the
/// keep-alive test, so A's load and what it sheds are the same); the servers also close
/// connections idle for a second. The clients' host has 1,000 ephemeral ports, as a busy
/// client host or a NAT reuses source ports: a client's new connection often reuses the
/// 4-tuple of an earlier one (with the kernel's default range, now and then). A request
/// unanswered within 4 s is a failure.
#[test]
fn two_hundred_clients_keep_their_sessions_when_servers_close_their_connections_first() {
    if require_root() {
        zero_failed_requests(DemoApp::Rust, &Load { churn: Churn::ServerCloses(5), idle_close_ms: Some(1000), timeout: Some(Duration::from_secs(4)), ports: Some("40000 40999") });
    }
}

/// How the clients use their connections, and what the servers add.
struct Load {
    churn: Churn,
    /// The demo applications' `--idle-close-ms`.
    idle_close_ms: Option<u64>,
    /// The clients' read and write timeout (default [`redirector_tests::http::TIMEOUT`]).
    timeout: Option<Duration>,
    /// The clients' ephemeral ports (`net.ipv4.ip_local_port_range`; default the kernel's).
    ports: Option<&'static str>,
}

impl Load {
    /// One keep-alive connection per client, the applications' defaults.
    const KEEP_ALIVE: Self = Self { churn: Churn::KeepAlive, idle_close_ms: None, timeout: None, ports: None };
}

/// 200 clients in loops drive A over its watermark; A sheds about half to B and C. Over the
/// whole run: every request answered (none timed out), and every client's counter goes 1, 2,
/// 3... (one per request, no gap or repeat), with its history and its own address, across the
/// move.
fn zero_failed_requests(kind: DemoApp, load: &Load) {
    let app_args: Vec<String> = load.idle_close_ms.map(|ms| vec!["--idle-close-ms".to_string(), ms.to_string()]).unwrap_or_default();
    let nodes = ["a", "b", "c"].iter().map(|n| ((*n).to_string(), NodeOpts { app_args: app_args.clone(), ..NodeOpts::default() })).collect();
    let c = Cluster::with_options(200, &[("a", 150, 100), ("b", 70, 50), ("c", 70, 50)], &Options { demo: Some(kind), nodes, ..Options::default() });
    let dst = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let ns = c.t.client.ns.clone();
    if let Some(range) = load.ports {
        c.t.client.sysctl("net.ipv4.ip_local_port_range", range);
    }
    let (churn, timeout) = (load.churn, load.timeout);
    // 200 clients, 20 threads of 10; each client loops on its connections for 8 s, and on
    // until it made 100 requests (a run shorter than that would mean little: on a busy machine
    // the Node.js demo's clients made 96 in 8 s). Bounded: at most 30 s (plus one round of
    // bounded requests) and 400 requests per client.
    let results = Arc::new(Mutex::new(Vec::new()));
    let (deadline, limit) = (Instant::now() + Duration::from_secs(8), Instant::now() + Duration::from_secs(30));
    let threads: Vec<_> = (0..20u16)
        .map(|t| {
            let (ns, results) = (ns.clone(), results.clone());
            std::thread::spawn(move || {
                let mut clients: Vec<HttpClient> = (1..=10)
                    .map(|i| {
                        let cl = HttpClient::new(&ns, IpAddr::V4(client4(t * 10 + i)), dst).churn(churn);
                        if let Some(d) = timeout { cl.timeout(d) } else { cl }
                    })
                    .collect();
                let mut rounds = 0;
                while (Instant::now() < deadline || rounds < 100) && Instant::now() < limit && rounds < 400 {
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
    let timeouts: u64 = clients.iter().map(|c| c.timeouts).sum();
    let broken: Vec<&HttpClient> = clients.iter().filter(|c| !c.intact()).collect();
    if !broken.is_empty() {
        for a in &c.apps {
            eprintln!("--- {} ---\n{}", a.log.display(), a.log());
        }
        report_broken(&c, &broken);
    }
    assert!(
        broken.is_empty(),
        "{} of 200 clients lost a request or broke their session ({total} requests, {timeouts} timed out):\n{}",
        broken.len(),
        broken.iter().take(20).map(|c| c.problems()).collect::<Vec<_>>().join("\n")
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
    // A volunteer that goes over its own high watermark gives adopted clients back (down to its
    // low one), and a client home again may move again later: a client was served by the
    // volunteer A steers it to now, if any, and otherwise only by volunteers it came home
    // from, which A counts.
    let handed_back = a["handoffs"]["handed_back"].as_u64().expect("A counts clients that came home");
    let mut came_home = 0u64;
    for cl in clients.iter() {
        let mut others: Vec<&String> = cl.servers.keys().filter(|s| *s != "A").collect();
        if let Some(to) = moved_to.get(&cl.src.to_string()) {
            let to = to.to_uppercase();
            assert!(others.contains(&&to), "{} moved to {to}: its later requests were served there (served by {others:?})", cl.src);
            others.retain(|s| **s != to);
        }
        came_home += u64::try_from(others.len()).expect("small");
    }
    assert!(came_home <= handed_back, "clients were served by {came_home} volunteers they are no longer at, but A counts {handed_back} that came home: {a}");
    let moved = moved_to.len();
    assert!(by.contains_key("B") && by.contains_key("C"), "both volunteers took clients (B and C have room for 70 each, 100 must move): {by:?}");
    // (Counting those that moved and came home: a volunteer that gave clients back makes A shed
    // again later, and the run may end in between.)
    assert!(
        moved <= 130 && moved + usize::try_from(handed_back).expect("small") >= 70,
        "about half of the 200 clients moved (A sheds down to its low watermark, 100): {moved} out now, {handed_back} came home; by server {by:?}; A said {a}"
    );
    let retries: u64 = clients.iter().map(|c| c.retries).sum();
    let connections: usize = clients.iter().map(HttpClient::connections).sum();
    eprintln!("{total} requests on {connections} connections, 0 failed, 0 broken sessions, {retries} retried once; {moved} clients moved; clients per server {by:?}");
}

/// For a failed run: where each broken client's session went (by A's status and by the
/// answers), and the TCP sockets of its address now: all of them on A (TIME-WAIT included),
/// the others only on B and C.
fn report_broken(c: &Cluster, broken: &[&HttpClient]) {
    let moved_to: BTreeMap<String, String> = migrated(&c.status("a")).into_iter().collect();
    let sockets: Vec<(&str, String)> = [("A", &c.t.a), ("B", &c.t.b), ("C", &c.t.c)].into_iter().map(|(n, h)| (n, h.exec(&["ss", "-Htan"]))).collect();
    for cl in broken.iter().take(20) {
        let src = cl.src.to_string();
        let mut servers: Vec<(&String, &u64)> = cl.servers.iter().collect();
        servers.sort();
        eprintln!(
            "--- {src}: moved to {}; {} requests on {} connections, answered by {servers:?}, {} timed out ---",
            moved_to.get(&src).map_or("nowhere", String::as_str),
            cl.requests,
            cl.connections(),
            cl.timeouts
        );
        for f in &cl.failures {
            eprintln!("  {f}");
        }
        for (n, ss) in &sockets {
            let mine = |l: &&str| l.split_whitespace().any(|f| f.rsplit_once(':').is_some_and(|(ip, _)| ip == src));
            for l in ss.lines().filter(mine).filter(|l| *n == "A" || !l.starts_with("TIME-WAIT")) {
                eprintln!("  on {n}: {l}");
            }
        }
    }
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

/// The test client opens a new connection every `n` requests: closing the old one itself, or
/// asking `Connection: close` on the `n`th, when the server must close (a server that keeps
/// the connection open after that fails the request).
#[test]
fn the_test_client_opens_a_new_connection_every_n_requests() {
    if !require_root() {
        return;
    }
    let t = Topology::new(1);
    let dst = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let src = IpAddr::V4(client4(1));
    let server = scripted(&t, vec![Step::Answer; 4]);
    let mut cl = HttpClient::new(&t.client.ns, src, dst).churn(Churn::ClientCloses(2));
    for _ in 0..4 {
        cl.request();
    }
    assert!(cl.intact(), "{}", cl.problems());
    assert_eq!((cl.connections(), cl.retries), (2, 0));
    drop(cl);
    assert_eq!(server.join().expect("server"), 2, "a new connection after every 2 requests");
    // The scripted server ignores Connection: close: the 2nd request fails.
    let server = scripted(&t, vec![Step::Answer; 2]);
    let mut cl = HttpClient::new(&t.client.ns, src, dst).churn(Churn::ServerCloses(2));
    cl.request();
    cl.request();
    assert_eq!((cl.answered, cl.failures.len()), (1, 1), "{:?}", cl.failures);
    assert!(cl.failures[0].contains("asked Connection: close"), "{:?}", cl.failures);
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
