//! Open connections move with their clients (`live_moves = true`, hook protocol version 3):
//! the Rust demo application on three servers with agents, 200 clients each on one keep-alive
//! connection that neither side ever closes, driving A over its watermark. A sheds about half
//! of them to B and C, and their connections go along: every client makes all its requests
//! on the one connection it opened, answered first by A, then by its volunteer, with no
//! request failed or retried and its session counter continuous.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redirector_tests::{
    agents::{Cluster, DemoApp, Options, migrated, service6, wait_status},
    http::HttpClient,
    net::{SERVICE4, client4, client6},
    require_root,
};

#[test]
fn keep_alive_connections_move_with_their_clients() {
    if require_root() {
        moves_live(false);
    }
}

#[test]
fn keep_alive_connections_move_with_their_clients_over_ipv6() {
    if require_root() {
        moves_live(true);
    }
}

fn moves_live(v6: bool) {
    let opts = Options { demo: Some(DemoApp::Rust), live_moves: true, dual: v6, ..Options::default() };
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
