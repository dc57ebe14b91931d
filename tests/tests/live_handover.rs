//! Open connections move with their clients (`live_moves = true`, hook protocol version 3):
//! the Rust demo application on three servers with agents, 200 clients each on one keep-alive
//! connection that neither side ever closes, driving A over its watermark. A sheds about half
//! of them to B and C, and their connections go along: every client makes all its requests
//! on the one connection it opened, answered first by A, then by its volunteer, with no
//! request failed or retried and its session counter continuous. They come home the same way
//! (an operator's give-back). And when an agent dies in the middle: a volunteer killed after
//! restoring leaves the connections on the origin, an origin killed after its rules (the
//! commit point) leaves them on the volunteer, and one killed before withdrawing its rules
//! in a hand-back leaves them on the volunteer too.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use redirector_tests::{
    agents::{Cluster, DemoApp, NodeOpts, Options, migrated, moved_to, service6, wait_log, wait_status},
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
    // Every agent, and every Rust application (its SDK), made room for the descriptors of a
    // big move when it started, not while clients waited.
    let mut procs: Vec<(String, u32)> = c.agents.iter().map(|(n, p)| (format!("agent {n}"), p.child.id())).collect();
    if kind == DemoApp::Rust {
        procs.extend(c.apps.iter().map(|p| (format!("application {}", p.log.display()), p.child.id())));
    }
    for (what, pid) in procs {
        let (size, soft) = descriptor_table(pid);
        let want = redirector_hook::fds::TABLE_ROOM.min(soft);
        assert!(size >= want, "{what}: its descriptor table holds {size}, less than the {want} reserved at start");
    }
    eprintln!("{total} requests on 200 connections, none failed, retried or reconnected; {} clients moved with their connections", moved_to.len());
}

/// Process `pid`'s descriptor table: its size and the soft limit of open descriptors.
fn descriptor_table(pid: u32) -> (usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process is alive");
    let size = status.lines().find_map(|l| l.strip_prefix("FDSize:")).and_then(|v| v.trim().parse().ok()).expect("FDSize");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("its limits");
    let soft = limits.lines().find_map(|l| l.strip_prefix("Max open files")).and_then(|v| v.split_whitespace().next()?.parse().ok()).expect("Max open files");
    (size, soft)
}

/// A (watermarks 20/10) and B (100/80), connections moving live, with these node options.
fn pair(nodes: &[(&str, NodeOpts)]) -> Cluster {
    pair_of(DemoApp::Rust, nodes, false)
}

/// [`pair`] with demo application `kind`, and IPv6 service addresses too when `v6`.
fn pair_of(kind: DemoApp, nodes: &[(&str, NodeOpts)], v6: bool) -> Cluster {
    let nodes = nodes.iter().map(|(n, o)| ((*n).to_string(), o.clone())).collect();
    let opts = Options { demo: Some(kind), live_moves: true, dual: v6, nodes, ..Options::default() };
    Cluster::with_options(40, &[("a", 20, 10), ("b", 100, 80)], &opts)
}

/// Requests of frozen clients wait longer than any agent restart here.
fn patient() -> Vec<String> {
    vec!["--freeze-wait-ms".into(), "30000".into()]
}

/// 30 keep-alive clients of A's service, until stopped (bounded: 60 s, 10,000 requests each).
fn drive(c: &Cluster) -> Crowd {
    drive_of(c, false)
}

/// [`drive`], over IPv6 when `v6`.
fn drive_of(c: &Cluster, v6: bool) -> Crowd {
    let dst = if v6 { service6("a") } else { SocketAddr::new(IpAddr::V4(SERVICE4), 80) };
    let srcs: Vec<(IpAddr, SocketAddr)> = (1..=30u16).map(|i| (if v6 { IpAddr::V6(client6(i)) } else { IpAddr::V4(client4(i)) }, dst)).collect();
    Crowd::start(&c.t.client.ns, &srcs, Duration::from_mins(1), 10_000)
}

#[test]
fn keep_alive_connections_come_home_with_their_clients() {
    if require_root() {
        comes_home(DemoApp::Rust, false);
    }
}

#[test]
fn keep_alive_connections_come_home_with_their_clients_over_ipv6() {
    if require_root() {
        comes_home(DemoApp::Rust, true);
    }
}

#[test]
fn the_node_js_demo_takes_its_connections_home_too() {
    if require_root() {
        comes_home(DemoApp::Node, false);
    }
}

/// A sheds clients to B, their connections along; then the operator takes them home
/// (`give-back` on A): their connections come home too. Every client makes all its requests on
/// the one connection it opened; those that moved were answered by A, then B, and last by A
/// again.
fn comes_home(kind: DemoApp, v6: bool) {
    let c = pair_of(kind, &[], v6);
    let crowd = drive_of(&c, v6);
    wait_status(&c.sock("a"), 30, "A to shed clients to B", |v| v["migrated_out"].as_array().is_some_and(|m| !m.is_empty()));
    // Served by B for a while (and past the dwell after a move, which a give-back waits out).
    std::thread::sleep(Duration::from_millis(2500));
    let home: Vec<IpAddr> = moved_to(&c.status("a")).into_keys().collect();
    let answer = c.give_back("a", &home).expect("give-back");
    assert_eq!(answer["given_back"].as_u64(), Some(home.len() as u64), "every client came home: {answer}");
    // Served by A again, for less than the dwell after which A may shed them again.
    std::thread::sleep(Duration::from_secs(1));
    // The TCP state of every connection now, should one not have come home.
    let sockets = |ns: &str| {
        redirector_tests::net::in_netns(ns, || {
            std::process::Command::new("ss").args(["-tinoeH"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
        })
    };
    let snapshot = ["client", "a", "b"].map(|n| (n, sockets(if n == "client" { &c.t.client.ns } else { &c.host(n).ns })));
    let clients = crowd.stop();
    assert_one_connection_each(&c, &clients);
    if let Some(cl) = clients.iter().find(|cl| home.contains(&cl.src) && cl.last_server.as_deref() != Some("A")) {
        for n in ["a", "b"] {
            eprintln!("--- agent {n} ---\n{}\n--- app {n} ---\n{}", c.log(n), c.app_log(n));
        }
        let needle = if v6 { format!("[{}]:", cl.src) } else { format!("{}:", cl.src) };
        for (n, s) in &snapshot {
            eprintln!("--- sockets of {} in {n} a second after the give-back ---", cl.src);
            let mut lines = s.lines().peekable();
            while let Some(l) = lines.next() {
                if l.contains(&needle) {
                    eprintln!("{l}\n{}", lines.peek().copied().unwrap_or_default());
                }
            }
        }
    }
    for cl in clients.iter().filter(|cl| home.contains(&cl.src)) {
        assert!(
            cl.servers.contains_key("B") && cl.last_server.as_deref() == Some("A"),
            "{} went to B and came home on its one connection: answered by {:?}, last by {:?}",
            cl.src,
            cl.servers,
            cl.last_server
        );
    }
    assert!(c.log("b").contains("connections went home"), "B sent the connections home:\n{}", c.log("b"));
    eprintln!("{} clients came home with their connections", home.len());
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

#[test]
fn an_origin_killed_before_taking_connections_home_leaves_them_on_the_volunteer() {
    if !require_root() {
        return;
    }
    let patient_app = || NodeOpts { app_args: patient(), ..NodeOpts::default() };
    let mut c = pair(&[("a", patient_app()), ("b", patient_app())]);
    let crowd = drive(&c);
    wait_status(&c.sock("a"), 30, "A to shed clients to B", |v| v["migrated_out"].as_array().is_some_and(|m| !m.is_empty()) && v["handoffs"]["clients_in_progress"] == 0);
    std::thread::sleep(Duration::from_secs(1));
    let home: Vec<IpAddr> = moved_to(&c.status("a")).into_keys().collect();
    // A's agent again, now stopping before it withdraws the rules of a hand-back (the commit
    // point): after it froze the flows and restored the connections that came.
    c.kill_agent("a");
    c.start_again("a", Some("pause-before-rules=60000"));
    wait_status(&c.sock("a"), 30, "A to see B and its application again", |v| {
        v["siblings"].as_array().is_some_and(|s| s.iter().all(|x| x["up"] == true)) && v["hook"]["registered"].as_array().is_some_and(|r| !r.is_empty())
    });
    let (sock, asked) = (c.sock("a"), home.clone());
    // Answered by nobody: the agent asked dies.
    let _give_back = std::thread::spawn(move || {
        let mut args: Vec<String> = vec!["give-back".into()];
        args.extend(asked.iter().map(ToString::to_string));
        std::process::Command::new(redirector_tests::net::redirector_bin()).args(&args).arg("--socket").arg(sock).output()
    });
    wait_log(&c, "a", "TEST FAULT pause", 30);
    assert!(c.log("a").contains("connections coming home frozen"), "A froze the connections coming home:\n{}", c.log("a"));
    c.kill_agent("a");
    c.start_again("a", None);
    // A's new agent thaws the flows and finds the hand-back aborted (its rules still send the
    // clients to B); B asks, resumes the connections it dumped and its application serves them.
    wait_status(&c.sock("b"), 30, "B to learn how the hand-back ended", |v| v["handoffs"]["awaiting_outcome"] == 0 && v["hook"]["unconfirmed"] == 0);
    std::thread::sleep(Duration::from_secs(2));
    let clients = crowd.stop();
    assert_one_connection_each(&c, &clients);
    for cl in clients.iter().filter(|cl| home.contains(&cl.src)) {
        assert_eq!(cl.last_server.as_deref(), Some("B"), "{} stayed on B on its one connection: answered by {:?}", cl.src, cl.servers);
    }
    let steered = moved_to(&c.status("a"));
    assert!(home.iter().all(|h| steered.contains_key(h)), "A still steers them to B: {steered:?}");
}
