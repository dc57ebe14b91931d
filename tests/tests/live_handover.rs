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
    time::{Duration, Instant},
};

use redirector_tests::{
    agents::{Cluster, DemoApp, NodeOpts, Options, migrated, service6, wait_log, wait_status},
    crowd::Crowd,
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
    // 200 clients, each on one keep-alive connection. Bounded: at most 8 s and 400 requests
    // per client.
    let srcs: Vec<(IpAddr, SocketAddr)> = (1..=200u16).map(|i| (if v6 { IpAddr::V6(client6(i)) } else { IpAddr::V4(client4(i)) }, dst)).collect();
    let (t0, run) = (Instant::now(), Duration::from_secs(8));
    let crowd = Crowd::start(&c.t.client.ns, &srcs, run, 400);
    wait_status(&c.sock("a"), 20, "A to shed clients to B and C", |v| v["migrated_out"].as_array().is_some_and(|m| m.len() >= 50));
    // The clients stop by themselves at the end of their run.
    std::thread::sleep(run.saturating_sub(t0.elapsed()));
    let clients = crowd.stop();
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
    // Every moved client was answered by its volunteer on its one connection (by A before, if
    // its first request came before the move: a connection A had accepted but not answered on
    // yet moves too).
    assert!(moved_to.len() >= 50, "about half of the 200 clients moved: {} did", moved_to.len());
    let mut both = 0;
    for cl in clients.iter() {
        if let Some(to) = moved_to.get(&cl.src.to_string()) {
            let to = to.to_uppercase();
            assert!(cl.servers.contains_key(&to), "{} moved to {to} on its one connection: answered by {:?}", cl.src, cl.servers);
            both += usize::from(cl.servers.contains_key("A"));
        } else {
            assert_eq!(cl.servers.keys().collect::<Vec<_>>(), vec!["A"], "{} stayed on A", cl.src);
        }
    }
    assert!(both * 2 >= moved_to.len(), "most moved clients were answered by A first, then by their volunteer: {both} of {}", moved_to.len());
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

/// 30 keep-alive clients of A's service, until stopped (bounded: 60 s, 10,000 requests each).
fn drive(c: &Cluster) -> Crowd {
    let dst = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let srcs: Vec<(IpAddr, SocketAddr)> = (1..=30u16).map(|i| (IpAddr::V4(client4(i)), dst)).collect();
    Crowd::start(&c.t.client.ns, &srcs, Duration::from_mins(1), 10_000)
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
    let crowd = drive(&c);
    wait_log(&c, "b", "TEST FAULT delay-ack", 30);
    assert!(c.log("b").contains("open_connections="), "B restored connections before the fault:\n{}", c.log("b"));
    c.kill_agent("b");
    wait_log(&c, "a", "its connections go on here", 20);
    std::thread::sleep(Duration::from_secs(1));
    let clients = crowd.stop();
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
    let crowd = drive(&c);
    wait_log(&c, "a", "TEST FAULT pause", 30);
    c.kill_agent("a");
    c.start_again("a", None);
    // A's new agent thaws the flows, finds the hand-over committed; B asks it and takes the
    // connections live, its application serves them.
    wait_status(&c.sock("b"), 30, "B to learn how the hand-over ended", |v| v["handoffs"]["awaiting_outcome"] == 0 && v["hook"]["unconfirmed"] == 0);
    std::thread::sleep(Duration::from_secs(2));
    let clients = crowd.stop();
    assert_one_connection_each(&c, &clients);
    let moved_to: BTreeMap<String, String> = migrated(&c.status("a")).into_iter().collect();
    assert!(!moved_to.is_empty(), "clients moved to B");
    for cl in &clients {
        if moved_to.contains_key(&cl.src.to_string()) {
            assert!(cl.servers.contains_key("B"), "{} moved to B on its one connection: answered by {:?}", cl.src, cl.servers);
        }
    }
}
