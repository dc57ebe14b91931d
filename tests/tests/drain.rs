//! `redirector drain` and `undrain` with the real demo applications (sessions = true) and a
//! crowd of 100 busy clients: the drained server moves every client away with its session
//! (no request fails, every session counter goes on), ends with no clients, stays drained
//! across a restart of its agent, and takes load again once undrained.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use redirector_tests::{
    agents::{Cluster, DemoApp, NodeOpts, Options, adopted, migrated, moved_to, wait_status},
    crowd::Crowd,
    net::{SERVICE4, client4},
    require_root,
};

#[test]
fn a_drained_server_moves_every_busy_client_away_with_its_session_and_takes_load_again_when_undrained() {
    if !require_root() {
        return;
    }
    // A is far under its watermarks: only the drain moves anything. B and C have room for
    // all of A's clients between them. A takes clients home 2 s after it has room.
    let opts = Options {
        demo: Some(DemoApp::Rust),
        nodes: vec![("a".to_string(), NodeOpts { extra: "home_after_secs = 2\n".into(), ..NodeOpts::default() })].into_iter().collect(),
        ..Options::default()
    };
    let mut c = Cluster::with_options(100, &[("a", 150, 100), ("b", 80, 60), ("c", 80, 60)], &opts);
    let clients: Vec<(IpAddr, SocketAddr)> = (1..=100).map(|i| (IpAddr::V4(client4(i)), SocketAddr::new(IpAddr::V4(SERVICE4), 80))).collect();
    let crowd = Crowd::start(&c.t.client.ns, &clients, Duration::from_secs(90), 20_000);
    wait_status(&c.sock("a"), 20, "A to serve its 100 clients", |v| v["load"].as_u64() == Some(100));

    let done = c.ask_agent("a", &["drain".into(), "--timeout-secs".into(), "60".into()]).expect("drain");
    eprintln!("drain: {done}");
    assert_eq!(done["moved_out"], 100, "every client of A is on a sibling: {done}");
    assert_eq!(done["adopted"], 0, "{done}");
    let a = c.status("a");
    assert_eq!(a["drain"]["done"], true, "{a}");
    assert_eq!(moved_to(&a).len(), 100, "{a}");
    let (b, cc) = (adopted(&c.status("b")).len(), adopted(&c.status("c")).len());
    assert_eq!(b + cc, 100, "B and C serve them: {b} + {cc}");
    // The applications close the moved clients' connections once their sessions left: A
    // ends with no clients at all.
    wait_status(&c.sock("a"), 10, "A's connections to end", |v| v["load"].as_u64() == Some(0));
    let again = c.ask_agent("a", &["drain".into()]).expect("drain again");
    assert_eq!(again["already"], true, "draining a drained node changes nothing: {again}");

    // Maintenance: A's agent restarts; A stays drained and its clients stay away.
    c.term_agent("a", 10);
    c.start_again("a", None);
    let a = wait_status(&c.sock("a"), 10, "A's agent to come back drained", |v| v["drain"]["done"] == true);
    assert_eq!(moved_to(&a).len(), 100, "the clients stayed on B and C across the restart: {a}");
    let refused = c.give_back("a", &[IpAddr::V4(client4(1))]).expect_err("a drained node takes no client home");
    assert!(refused.contains("drained"), "{refused}");

    let undrained = c.ask_agent("a", &["undrain".into()]).expect("undrain");
    assert_eq!(undrained["drained"], false, "{undrained}");
    let a = wait_status(&c.sock("a"), 30, "A to take clients home", |v| v["handoffs"]["handed_back"].as_u64() >= Some(50) && v["load"].as_u64() >= Some(50));
    assert!(a["drain"].is_null(), "{a}");
    std::thread::sleep(Duration::from_secs(2));
    let clients = crowd.finish_where_steered("A", || moved_to(&c.status("a")));
    c.assert_intact(&clients);
    let home = clients.iter().filter(|cl| cl.servers.len() > 1 && cl.last_server.as_deref() == Some("A")).count();
    assert!(home >= 50, "{home} clients went away and came home, every session intact");
}

/// A volunteer drained for maintenance gives its adopted clients back to their origin; their
/// rules drain to it for `drain_secs` (their open connections end there), and no other
/// volunteer's rule may replace them meanwhile. The origin, over its high watermark again,
/// sheds its other clients to the server that came up since. Before, it picked the clients
/// that had just come home (the lowest addresses, as the first time), the kernel refused to
/// steer them elsewhere, and every hand-over failed for the whole drain (60 s).
#[test]
fn an_origin_sheds_its_other_clients_while_those_a_drained_volunteer_gave_back_drain_to_it() {
    if !require_root() {
        return;
    }
    let opts = Options { demo: Some(DemoApp::Rust), nodes: vec![("c".to_string(), NodeOpts { later: true, ..NodeOpts::default() })].into_iter().collect(), ..Options::default() };
    let mut c = Cluster::with_options(100, &[("a", 80, 60), ("b", 100, 60), ("c", 100, 60)], &opts);
    let clients: Vec<(IpAddr, SocketAddr)> = (1..=100).map(|i| (IpAddr::V4(client4(i)), SocketAddr::new(IpAddr::V4(SERVICE4), 80))).collect();
    let crowd = Crowd::start(&c.t.client.ns, &clients, Duration::from_secs(60), 6000);
    let a = wait_status(&c.sock("a"), 30, "A to shed 40 clients to B", |v| migrated(v).len() == 40 && v["shedding"] == false);
    let first: Vec<IpAddr> = moved_to(&a).into_keys().collect();
    c.start_again("c", None);
    wait_status(&c.sock("c"), 10, "C's application to register", |v| v["hook"]["registered"].as_array().is_some_and(|r| !r.is_empty()));
    wait_status(&c.sock("a"), 10, "A to link to C", |v| v["siblings"].as_array().is_some_and(|s| s.iter().any(|s| s["name"] == "c" && s["up"] == true)));
    let done = c.ask_agent("b", &["drain".into(), "--timeout-secs".into(), "30".into()]).expect("drain B");
    assert_eq!(done["adopted"], 0, "B gave every client back: {done}");
    // A is over its high watermark again (100 > 80): the 40 it shed first drain to B, so it
    // sheds 40 others to C, well within the drain.
    let a = wait_status(&c.sock("a"), 20, "A to shed 40 other clients to C", |v| {
        let to = moved_to(v);
        to.len() == 40 && to.values().all(|n| n == "c") && v["load"].as_u64() <= Some(80)
    });
    let now = moved_to(&a);
    assert!(first.iter().all(|cl| !now.contains_key(cl)), "the clients that came home stay home while their rules drain: {a}");
    std::thread::sleep(Duration::from_secs(2));
    let served = crowd.finish_where_steered("A", || moved_to(&c.status("a")));
    c.assert_intact(&served);
}
