//! Open connections move with their clients (`live_moves = true`, hook protocol version 3):
//! the Rust demo application on three servers with agents, 200 clients each on one keep-alive
//! connection that neither side ever closes, driving A over its watermark. A sheds about half
//! of them to B and C, and their connections go along: every client makes all its requests
//! on the one connection it opened, answered first by A, then by its volunteer, with no
//! request failed or retried and its session counter continuous. And when an agent dies in
//! the middle: a volunteer killed after restoring leaves the connections on the origin, an
//! origin killed after its rules (the commit point) leaves them on the volunteer.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use redirector_tests::{
    agents::{Cluster, DemoApp, NodeOpts, Options, migrated, service6, wait_log, wait_status},
    http::HttpClient,
    net::{SERVICE4, client4, client6},
    require_root,
};

#[test]
fn keep_alive_connections_move_with_their_clients() {
    if require_root() {
        moves_live(DemoApp::Rust, false);
    }
}

#[test]
fn keep_alive_connections_move_with_their_clients_over_ipv6() {
    if require_root() {
        moves_live(DemoApp::Rust, true);
    }
}

#[test]
fn the_node_js_demo_moves_its_connections_too() {
    if require_root() {
        moves_live(DemoApp::Node, false);
    }
}

fn moves_live(kind: DemoApp, v6: bool) {
    let opts = Options { demo: Some(kind), live_moves: true, dual: v6, ..Options::default() };
    let c = Cluster::with_options(200, &[("a", 150, 100), ("b", 150, 100), ("c", 150, 100)], &opts);
    let dst = if v6 { service6("a") } else { SocketAddr::new(IpAddr::V4(SERVICE4), 80) };
    let ns = c.t.client.ns.clone();
    // 200 clients, 20 threads of 10, each on one keep-alive connection. Bounded: at most 8 s
    // (plus one round of bounded requests) and 400 requests per client.
    let results = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(8);
    let threads: Vec<_> = (0..20u16)
        .map(|t| {
            let (ns, results) = (ns.clone(), results.clone());
            std::thread::spawn(move || {
                let src = |i: u16| if v6 { IpAddr::V6(client6(t * 10 + i)) } else { IpAddr::V4(client4(t * 10 + i)) };
                let mut clients: Vec<HttpClient> = (1..=10).map(|i| HttpClient::new(&ns, src(i), dst)).collect();
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
    let a = c.status("a");
    let moved_to: BTreeMap<String, String> = migrated(&a).into_iter().collect();
    let problems: Vec<String> = clients
        .iter()
        .filter(|cl| !cl.intact() || cl.retries > 0 || cl.connections() != 1)
        .map(|cl| format!("{} on {} connections, {} retried: {}", cl.src, cl.connections(), cl.retries, cl.problems()))
        .collect();
    if !problems.is_empty() {
        for p in &c.apps {
            eprintln!("--- {} ---\n{}", p.log.display(), p.log());
        }
        for n in ["a", "b", "c"] {
            eprintln!("--- agent {n} ---\n{}", c.log(n));
        }
    }
    assert!(problems.is_empty(), "{} of 200 clients failed, retried or reconnected:\n{}", problems.len(), problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n"));
    let total: u64 = clients.iter().map(|cl| cl.requests).sum();
    for cl in clients.iter() {
        assert!(cl.requests >= 100, "{} made {} requests: the run was too short to mean anything", cl.src, cl.requests);
    }
    // Every moved client was answered by A, then by its volunteer, on its one connection.
    assert!(moved_to.len() >= 50, "about half of the 200 clients moved: {} did", moved_to.len());
    for cl in clients.iter() {
        if let Some(to) = moved_to.get(&cl.src.to_string()) {
            let to = to.to_uppercase();
            assert!(cl.servers.contains_key("A") && cl.servers.contains_key(&to), "{} moved to {to} on its one connection: answered by {:?}", cl.src, cl.servers);
        } else {
            assert_eq!(cl.servers.keys().collect::<Vec<_>>(), vec!["A"], "{} stayed on A", cl.src);
        }
    }
    eprintln!("{total} requests on 200 connections, none failed, retried or reconnected; {} clients moved with their connections", moved_to.len());
}

/// A (watermarks 20/10) and B (100/80), connections moving live, with these node options.
fn pair(nodes: &[(&str, NodeOpts)]) -> Cluster {
    let opts = Options { demo: Some(DemoApp::Rust), live_moves: true, nodes: nodes.iter().map(|(n, o)| ((*n).to_string(), o.clone())).collect(), ..Options::default() };
    Cluster::with_options(40, &[("a", 20, 10), ("b", 100, 80)], &opts)
}

/// Requests of frozen clients wait longer than any agent restart here.
fn patient() -> Vec<String> {
    vec!["--freeze-wait-ms".into(), "30000".into()]
}

/// 30 keep-alive clients of A's service in a loop on a thread, until stopped (bounded: 60 s).
fn drive(c: &Cluster) -> (Arc<AtomicBool>, std::thread::JoinHandle<Vec<HttpClient>>) {
    let (dst, ns) = (SocketAddr::new(IpAddr::V4(SERVICE4), 80), c.t.client.ns.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut clients: Vec<HttpClient> = (1..=30).map(|i| HttpClient::new(&ns, IpAddr::V4(client4(i)), dst)).collect();
        let t0 = Instant::now();
        while !s.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_mins(1) {
            for cl in &mut clients {
                cl.request();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        clients
    });
    (stop, thread)
}

/// Every client answered every time, on the one connection it opened.
fn assert_one_connection_each(c: &Cluster, clients: &[HttpClient]) {
    let problems: Vec<String> = clients
        .iter()
        .filter(|cl| !cl.intact() || cl.retries > 0 || cl.connections() != 1 || cl.requests < 20)
        .map(|cl| format!("{}: {} requests on {} connections, {} retried: {}", cl.src, cl.requests, cl.connections(), cl.retries, cl.problems()))
        .collect();
    if !problems.is_empty() {
        for n in ["a", "b"] {
            eprintln!("--- agent {n} ---\n{}\n--- app {n} ---\n{}", c.log(n), c.app_log(n));
        }
    }
    assert!(problems.is_empty(), "{} of {} clients failed, retried or reconnected:\n{}", problems.len(), clients.len(), problems.join("\n"));
}

#[test]
fn a_volunteer_killed_after_restoring_leaves_the_connections_on_the_origin() {
    if !require_root() {
        return;
    }
    // B restores the connections, then waits 5 s before acknowledging: its agent dies then.
    let b = NodeOpts { faults: Some("delay-ack=5000".into()), ..NodeOpts::default() };
    let a = NodeOpts { app_args: patient(), ..NodeOpts::default() };
    let mut c = pair(&[("a", a), ("b", b)]);
    let (stop, thread) = drive(&c);
    wait_log(&c, "b", "TEST FAULT delay-ack", 30);
    assert!(c.log("b").contains("open_connections="), "B restored connections before the fault:\n{}", c.log("b"));
    c.kill_agent("b");
    wait_log(&c, "a", "its connections go on here", 20);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let clients = thread.join().expect("clients");
    assert_one_connection_each(&c, &clients);
    for cl in &clients {
        assert_eq!(cl.servers.keys().collect::<Vec<_>>(), vec!["A"], "{} stayed on A", cl.src);
    }
    assert!(c.rules("a").iter().all(|r| r["state"] != "active"), "nothing steered: {:?}", c.rules("a"));
}

#[test]
fn an_origin_killed_after_its_rules_leaves_the_connections_on_the_volunteer() {
    if !require_root() {
        return;
    }
    // A stops between installing the rules (the commit point) and anything after it.
    let a = NodeOpts { faults: Some("pause-before-commit=60000".into()), app_args: patient(), ..NodeOpts::default() };
    let mut c = pair(&[("a", a)]);
    let (stop, thread) = drive(&c);
    wait_log(&c, "a", "TEST FAULT pause", 30);
    c.kill_agent("a");
    c.start_again("a", None);
    // A's new agent thaws the flows, finds the hand-over committed; B asks it and takes the
    // connections live, its application serves them.
    wait_status(&c.sock("b"), 30, "B to learn how the hand-over ended", |v| v["handoffs"]["awaiting_outcome"] == 0 && v["hook"]["unconfirmed"] == 0);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let clients = thread.join().expect("clients");
    assert_one_connection_each(&c, &clients);
    let moved_to: BTreeMap<String, String> = migrated(&c.status("a")).into_iter().collect();
    assert!(!moved_to.is_empty(), "clients moved to B");
    for cl in &clients {
        if moved_to.contains_key(&cl.src.to_string()) {
            assert!(cl.servers.contains_key("B"), "{} moved to B on its one connection: answered by {:?}", cl.src, cl.servers);
        }
    }
}
