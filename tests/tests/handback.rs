//! Sessions come home too: clients handed back with their sessions by each trigger (an
//! operator, a volunteer over its own high watermark, an origin that has had room for a while,
//! SIGTERM on the volunteer and on the origin), with the real demo applications and a crowd of
//! 200 busy clients. Each time: every request answered, every session counter continuous
//! (1, 2, 3... across every move, also on a fresh connection at the end), and the clients
//! served where the origin's rules say.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use redirector_tests::{
    agents::{Cluster, DemoApp, NodeOpts, Options, adopted, migrated, moved_to, wait_shed, wait_status},
    crowd::Crowd,
    net::{SERVICE4, SERVICE4_B, client4},
    require_root,
};

fn a_svc() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(SERVICE4), 80)
}

/// A cluster of demo applications (sessions = true) with these nodes (name, high, low) and
/// settings of some of them.
fn cluster(kind: DemoApp, clients: u16, nodes: &[(&str, u64, u64)], opts: Vec<(&str, NodeOpts)>) -> Cluster {
    let opts = Options { demo: Some(kind), nodes: opts.into_iter().map(|(n, o)| (n.to_string(), o)).collect(), ..Options::default() };
    Cluster::with_options(clients, nodes, &opts)
}

/// Every `Commit` of node `name` waits 300 ms on its link: what the node says next on the
/// other connection arrives first, and a node that exited at once would lose it.
fn slow_commits(name: &str) -> (&str, NodeOpts) {
    (name, NodeOpts { faults: Some("delay-commit=300".into()), ..NodeOpts::default() })
}

/// Clients `range` of A's service, busy for at most 60 s and 6000 requests each.
fn crowd(c: &Cluster, range: std::ops::RangeInclusive<u16>, dst: SocketAddr) -> Crowd {
    let clients: Vec<(IpAddr, SocketAddr)> = range.map(|i| (IpAddr::V4(client4(i)), dst)).collect();
    Crowd::start(&c.t.client.ns, &clients, Duration::from_secs(60), 6000)
}

/// A (150/100) with 200 busy clients sheds about half of them to B and C (70/50 each).
fn shed_half(kind: DemoApp, opts: Vec<(&str, NodeOpts)>) -> (Cluster, Crowd, serde_json::Value) {
    let c = cluster(kind, 200, &[("a", 150, 100), ("b", 70, 50), ("c", 70, 50)], opts);
    let crowd = crowd(&c, 1..=200, a_svc());
    let a = wait_shed(&c.sock("a"), 70, 30, "A to shed clients to B and C");
    (c, crowd, a)
}

fn operator_gives_clients_back(kind: DemoApp) {
    let (c, crowd, a) = shed_half(kind, Vec::new());
    // 20 of the clients on B come home, from A's own command line.
    let home: Vec<IpAddr> = moved_to(&a).into_iter().filter(|(_, to)| to == "b").map(|(c, _)| c).take(20).collect();
    assert_eq!(home.len(), 20, "B took at least 20 clients: {a}");
    let answer = c.give_back("a", &home).expect("give-back");
    assert_eq!(answer["given_back"], 20, "every one of them came home: {answer}");
    let a = c.status("a");
    let steered = moved_to(&a);
    assert!(home.iter().all(|h| !steered.contains_key(h)), "none of them is steered any more: {a}");
    assert!(a["handoffs"]["handed_back"].as_u64() >= Some(20), "{a}");
    let b = c.status("b");
    let on_b: HashSet<String> = adopted(&b).into_iter().collect();
    assert!(home.iter().all(|h| !on_b.contains(&h.to_string())), "B gave them up (their room is free): {b}");
    std::thread::sleep(Duration::from_secs(2));
    let clients = crowd.finish_where_steered("A", || moved_to(&c.status("a")));
    c.assert_intact(&clients);
    for cl in clients.iter().filter(|cl| home.contains(&cl.src)) {
        assert!(cl.servers.contains_key("B"), "{} was on B first", cl.src);
    }
}

#[test]
fn an_operator_gives_clients_back_and_their_sessions_come_home() {
    if require_root() {
        operator_gives_clients_back(DemoApp::Rust);
    }
}

#[test]
fn the_node_js_demo_gives_clients_back_too() {
    if require_root() {
        operator_gives_clients_back(DemoApp::Node);
    }
}

/// B takes 100 of A's clients, then 40 clients of its own push it over its high watermark:
/// it gives adopted clients back to A first (it cannot steer them itself), with their
/// sessions, rather than move anyone of its own. A's commits reach B after A's answer to the
/// give-back (they travel on the other connection; here a fault makes that certain): B waits
/// for them rather than count the clients as still here.
#[test]
fn a_volunteer_over_its_high_watermark_gives_adopted_clients_back() {
    if !require_root() {
        return;
    }
    let c = cluster(DemoApp::Rust, 240, &[("a", 150, 100), ("b", 120, 100)], vec![slow_commits("a")]);
    let to_a = crowd(&c, 1..=200, a_svc());
    let a = wait_status(&c.sock("a"), 30, "A to shed clients to B", |v| migrated(v).len() >= 90);
    let adopted_first = migrated(&a).len();
    wait_status(&c.sock("b"), 20, "B to serve the adopted clients", |v| v["load"].as_u64() >= Some(90));
    let own = crowd(&c, 201..=240, SocketAddr::new(IpAddr::V4(SERVICE4_B), 80));
    let b = wait_status(&c.sock("b"), 30, "B to give clients back", |v| adopted(v).len() + 20 <= adopted_first);
    let a = wait_status(&c.sock("a"), 10, "A to count them home", |v| v["handoffs"]["handed_back"].as_u64() >= Some(20));
    std::thread::sleep(Duration::from_secs(2));
    let mut clients = to_a.finish_where_steered("A", || moved_to(&c.status("a")));
    let theirs = own.finish();
    c.assert_intact(&clients);
    c.assert_intact(&theirs);
    assert!(migrated(&c.status("b")).is_empty(), "B moved none of its own clients: giving back was enough: {b}");
    clients.retain(|cl| cl.servers.contains_key("B") && cl.last_server.as_deref() == Some("A"));
    assert!(clients.len() >= 20, "at least 20 clients came home from B with their sessions: {} (A: {a})", clients.len());
}

/// A takes clients home once its own load has stayed under its low watermark for
/// `home_after_secs`, as many as keep it under.
#[test]
fn an_origin_with_room_takes_its_clients_home() {
    if !require_root() {
        return;
    }
    let (c, crowd, a) = shed_half(DemoApp::Rust, vec![("a", NodeOpts { extra: "home_after_secs = 2\n".into(), ..NodeOpts::default() })]);
    let steered = moved_to(&a);
    // 80 of the clients A kept stop: A's load falls to about 20.
    let leaving: Vec<IpAddr> = (1..=200).map(|i| IpAddr::V4(client4(i))).filter(|c| !steered.contains_key(c)).take(80).collect();
    crowd.send_home(&leaving);
    let a = wait_status(&c.sock("a"), 30, "A to take clients home", |v| v["handoffs"]["handed_back"].as_u64() >= Some(40));
    assert!(a["load"].as_u64() <= Some(100), "it took no more than keeps it under its low watermark: {a}");
    std::thread::sleep(Duration::from_secs(2));
    let clients = crowd.finish_where_steered("A", || moved_to(&c.status("a")));
    c.assert_intact(&clients);
    let now = moved_to(&c.status("a"));
    assert!(now.len() + 40 <= steered.len(), "clients came home: {} moved before, {} now", steered.len(), now.len());
    let home = clients.iter().filter(|cl| steered.contains_key(&cl.src) && !now.contains_key(&cl.src)).count();
    assert!(home >= 40, "{home} clients were served back home with their sessions");
}

/// SIGTERM on a volunteer: it gives its adopted clients back before it exits.
#[test]
fn a_volunteer_stopped_with_sigterm_gives_its_clients_back_first() {
    if !require_root() {
        return;
    }
    let (mut c, crowd, a) = shed_half(DemoApp::Rust, Vec::new());
    let on_b = moved_to(&a).values().filter(|to| *to == "b").count();
    assert!(on_b > 0, "B took clients: {a}");
    let took = c.term_agent("b", 20);
    assert!(took < Duration::from_secs(11), "B gave its clients back within exit_timeout_ms (10 s): {took:?}");
    let a = c.status("a");
    assert!(moved_to(&a).values().all(|to| to != "b"), "no client is steered to B any more: {a}");
    assert!(c.log("b").contains("every client is home or back with its origin"), "B said it handed everything back:\n{}", c.log("b"));
    std::thread::sleep(Duration::from_secs(2));
    let clients = crowd.finish_where_steered("A", || moved_to(&c.status("a")));
    c.assert_intact(&clients);
}

/// SIGTERM on the origin: it takes its clients home before it exits (no rule is left pointing
/// at a sibling that no agent here watches), and its last commits reach the volunteers before
/// it exits (they would keep the sessions frozen, and the clients' open connections there
/// would get 503s, with no origin left to ask).
#[test]
fn an_origin_stopped_with_sigterm_takes_its_clients_home_first() {
    if !require_root() {
        return;
    }
    let (mut c, crowd, a) = shed_half(DemoApp::Rust, vec![slow_commits("a")]);
    let steered = moved_to(&a);
    let took = c.term_agent("a", 20);
    assert!(took < Duration::from_secs(11), "A took its clients home within exit_timeout_ms (10 s): {took:?}");
    let rules = c.t.redirector_ok(&c.t.a, &["rule", "list", "--json"]);
    assert!(!rules.contains("\"active\""), "no rule of A steers anyone any more: {rules}");
    std::thread::sleep(Duration::from_secs(2));
    // A's agent is gone: nothing steers anyone.
    let clients = crowd.finish_where_steered("A", BTreeMap::new);
    c.assert_intact(&clients);
    let home = clients.iter().filter(|cl| steered.contains_key(&cl.src)).count();
    assert!(home >= 70, "{home} clients came home with their sessions");
    let by: HashMap<&str, usize> = clients.iter().flat_map(|cl| cl.servers.keys()).fold(HashMap::new(), |mut m, s| {
        *m.entry(s.as_str()).or_default() += 1;
        m
    });
    assert!(by.contains_key("B") && by.contains_key("C"), "both volunteers served clients first: {by:?}");
}
