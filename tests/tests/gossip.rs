//! Agents in gossip mode (`[cluster] mode = "gossip"`): no sibling lists, each node joins
//! through one seed (it asks the seed for the cluster's gossip key over mutual TLS), members
//! learn each other by gossip, an overloaded node asks members with room, a dead member's
//! clients come home, and a node whose certificate is denied never joins; and twelve servers
//! that lose three and gain two while four are overloaded.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use redirector_tests::{
    Client,
    agents::{Cluster, NodeOpts, Options, Sampler, max_load, members, migrated, open, served_by, wait_status},
    net::{SERVICE4, client4, in_netns},
    require_root,
};

fn svc(ip: std::net::Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), 80)
}

fn gossip(later: &[&str]) -> Options {
    let nodes = later.iter().map(|n| ((*n).to_string(), NodeOpts { later: true, ..NodeOpts::default() })).collect();
    Options { gossip: true, nodes, ..Options::default() }
}

/// The names an answer of a moved client may carry, by node name.
fn app_name(node: &str) -> String {
    node.strip_prefix('s').map_or_else(|| node.to_uppercase(), |i| format!("S{i}"))
}

#[test]
fn members_join_through_one_seed_and_an_overloaded_one_sheds_to_members_with_room() {
    if !require_root() {
        return;
    }
    // A starts the cluster; B, C and S1 know only A. The harness waits until every agent
    // holds the three others live.
    let mut c = Cluster::with_options(60, &[("a", 30, 20), ("b", 20, 10), ("c", 20, 10), ("s1", 20, 10)], &gossip(&[]));
    for n in ["a", "b", "c", "s1"] {
        let v = c.status(n);
        let expected: BTreeSet<String> = ["a", "b", "c", "s1"].into_iter().filter(|m| *m != n).map(str::to_string).collect();
        assert_eq!(members(&v).into_iter().collect::<BTreeSet<_>>(), expected, "{n} knows every other member: {}", v["cluster"]);
        assert_eq!(v["cluster"]["refused"], 0, "no datagram of the cluster was refused");
    }
    // doctor checks the seed B joins through.
    let out =
        std::process::Command::new(redirector_tests::net::redirector_bin()).args(["doctor", "--json", "--config"]).arg(c.dir.join("b.toml")).output().expect("running doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {text}"));
    let seed = report["checks"].as_array().and_then(|cs| cs.iter().find(|x| x["name"] == "seed a")).unwrap_or_else(|| panic!("doctor checks the seed: {report}"));
    assert_eq!(seed["outcome"], "pass", "{seed}");
    // Rooms travel with gossip: A sees each volunteer's (20 each, nothing served yet).
    wait_status(&c.sock("a"), 10, "A to see the others' room", |v| v["cluster"]["members"].as_array().is_some_and(|m| m.iter().all(|x| x["room"] == 20)));
    let sampler = Sampler::start(&c, &["b", "c", "s1"]);
    // 45 clients drive A over its high watermark (30): it moves clients until it is at 20.
    let conns = open(&c, 1..=45, svc(SERVICE4));
    assert_eq!(served_by(&conns).get("A"), Some(&45), "before shedding A serves everyone");
    let a = wait_status(&c.sock("a"), 30, "A to move clients under its low watermark", |v| migrated(v).len() >= 25);
    let moved: HashMap<String, String> = migrated(&a).into_iter().collect();
    drop(conns);
    std::thread::sleep(Duration::from_millis(300));
    // They reconnect (as a browser would): each moved one reaches its volunteer, with the
    // same address, the others stay with A.
    let conns = open(&c, 1..=45, svc(SERVICE4));
    for (i, _, who) in &conns {
        let expected = moved.get(&client4(*i).to_string()).map_or_else(|| "A".to_string(), |n| app_name(n));
        assert_eq!(*who, expected, "client {} is served by {expected}", client4(*i));
    }
    wait_status(&c.sock("a"), 20, "A's load under its low watermark", |v| v["load"].as_u64().is_some_and(|l| l <= 20));
    drop(conns);
    // The volunteers are watched a while longer with their new clients' connections closing.
    std::thread::sleep(Duration::from_secs(1));
    let samples = sampler.stop();
    for n in ["b", "c", "s1"] {
        let (max, count) = max_load(&samples[n]);
        assert!(count > 10 && max <= 20, "{n} never went over its high watermark (20): max {max} in {count} samples");
        for v in &samples[n] {
            let committed = v["load"].as_u64().unwrap_or(0) + v["promised"].as_u64().unwrap_or(0);
            assert!(committed <= 20, "{n} never promised past its high watermark: {v}");
        }
    }
    // Links open when needed: A has one to each member it moved clients to.
    let a = c.status("a");
    let linked: BTreeSet<String> = a["siblings"].as_array().expect("siblings").iter().filter(|s| s["up"] == true).filter_map(|s| s["name"].as_str().map(str::to_string)).collect();
    let asked: BTreeSet<String> = moved.values().cloned().collect();
    assert!(asked.is_subset(&linked), "A is linked with every volunteer it moved clients to: {asked:?} of {linked:?}");
    // A started the cluster (it has no seeds). Its agent restarts, and comes back through the
    // members it knew; it still steers the clients it moved.
    let steered = migrated(&c.status("a")).len();
    c.restart("a");
    // It knows their room too (gossiped only when it changes, so the others tell it).
    wait_status(&c.sock("a"), 30, "A's new agent to hold the others live again, with their room", |v| {
        v["cluster"]["members"].as_array().is_some_and(|m| m.len() == 3 && m.iter().all(|x| x["room"].is_number()))
    });
    for n in ["b", "c", "s1"] {
        wait_status(&c.sock(n), 30, &format!("{n} to hold A's new agent live"), |v| members(v).contains(&"a".to_string()));
    }
    assert_eq!(migrated(&c.status("a")).len(), steered, "A's new agent manages the rules its predecessor left");
}

/// The members A's outbound links are up to, from its status.
fn linked(v: &serde_json::Value) -> BTreeSet<String> {
    v["siblings"].as_array().into_iter().flatten().filter(|s| s["up"] == true).filter_map(|s| s["name"].as_str().map(str::to_string)).collect()
}

/// A keeps links to two members with room in advance (`standby = 2`), asks those (`ask = 2`)
/// when it is overloaded, so no link opens inside the negotiation; a link opened for one
/// client moved elsewhere by hand closes once it is idle and the client is home, while the
/// standby links stay.
#[test]
fn members_on_standby_are_linked_in_advance_and_asked_and_idle_links_close() {
    if !require_root() {
        return;
    }
    let mut opts = gossip(&[]);
    opts.nodes.insert("a".into(), NodeOpts { cluster: "ask = 2\nstandby = 2\nidle_link_secs = 3\n".into(), ..NodeOpts::default() });
    let c = Cluster::with_options(60, &[("a", 30, 20), ("b", 20, 10), ("c", 20, 10), ("s1", 20, 10), ("s2", 20, 10)], &opts);
    let a = wait_status(&c.sock("a"), 20, "A to link two members on standby", |v| {
        let standby: BTreeSet<String> = v["cluster"]["standby"].as_array().into_iter().flatten().filter_map(|x| x.as_str().map(str::to_string)).collect();
        standby.len() == 2 && linked(v) == standby
    });
    let standby = linked(&a);
    // 45 clients drive A over its high watermark (30): the two on standby have room for the
    // 25 it moves (20 each), and are the two it asks.
    let conns = open(&c, 1..=45, svc(SERVICE4));
    let a = wait_status(&c.sock("a"), 30, "A to move clients under its low watermark", |v| migrated(v).len() >= 25 && v["shedding"] == false);
    let to: BTreeSet<String> = migrated(&a).into_iter().map(|(_, n)| n).collect();
    assert!(to.is_subset(&standby), "A moved clients to members on standby only: {to:?} of {standby:?}");
    assert_eq!(linked(&a), standby, "no other link was opened");
    drop(conns);
    // One client, moved by hand to a member not on standby, then brought home: the link
    // opened for it closes once idle (3 s); those on standby stay.
    let other = ["b", "c", "s1", "s2"].into_iter().find(|n| !standby.contains(*n)).expect("a member not on standby");
    let x = IpAddr::V4(client4(60));
    let _conn = open(&c, 60..=60, svc(SERVICE4));
    wait_status(&c.sock("a"), 10, "A to count the 60th client", |v| v["load"].as_u64() >= Some(1));
    c.ask_agent("a", &["move".into(), x.to_string(), "--to".into(), other.into()]).expect("move --to");
    assert!(linked(&c.status("a")).contains(other), "linked to {other} for the move");
    c.give_back("a", &[x]).expect("give-back");
    let a = wait_status(&c.sock("a"), 15, &format!("A to close its idle link to {other}"), |v| !linked(v).contains(other));
    assert!(standby.is_subset(&linked(&a)), "the standby links stay: {a}");
}

#[test]
fn a_dead_members_clients_come_home_and_the_cluster_forgets_it() {
    if !require_root() {
        return;
    }
    // Drains of 2 s, and a member gone is forgotten 2 s after, once nothing refers to it.
    let mut opts = gossip(&[]);
    opts.extra = "drain_secs = 2\n".into();
    for n in ["a", "b", "c"] {
        opts.nodes.insert(n.into(), NodeOpts { cluster: "forget_secs = 2\n".into(), ..NodeOpts::default() });
    }
    let mut c = Cluster::with_options(40, &[("a", 20, 10), ("b", 40, 30), ("c", 10, 5)], &opts);
    let conns = open(&c, 1..=30, svc(SERVICE4));
    // C has room for 10 at most, B for 40: A asks whoever has room.
    let a = wait_status(&c.sock("a"), 30, "A to move clients", |v| migrated(v).len() >= 20);
    drop(conns);
    let on_b: Vec<String> = migrated(&a).into_iter().filter(|m| m.1 == "b").map(|m| m.0).collect();
    assert!(!on_b.is_empty(), "A moved clients to B: {}", a["migrated_out"]);
    let died = Instant::now();
    c.agents.get_mut("b").expect("agent b").kill();
    c.t.b.ip(&["link", "set", "eth0", "down"]);
    // The link's liveness (1.5 s here) or gossip's verdict, whichever comes first, brings
    // B's clients home: its rules drain.
    wait_status(&c.sock("a"), 15, "A to take B's clients back", |v| migrated(v).iter().all(|m| m.1 != "b"));
    let took = died.elapsed();
    // And the cluster declares B dead (suspicion included), everywhere.
    for n in ["a", "c"] {
        wait_status(&c.sock(n), 15, &format!("{n} to hold B dead"), |v| !members(v).contains(&"b".to_string()));
    }
    let first: u16 = on_b[0].rsplit('.').next().and_then(|x| x.parse().ok()).expect("client number");
    let mut back = Client::connect(&c.t.client.ns, IpAddr::V4(client4(first)), svc(SERVICE4));
    assert_eq!(back.who(), "A", "a client moved to the dead member is served by A again");
    assert!(took < Duration::from_secs(10), "B's clients came home {took:?} after it died");
    // Once its clients' rules drained, A and C forget B: it is no longer among their
    // siblings, nor among the members they keep for their next start.
    let listed = |v: &serde_json::Value| v["siblings"].as_array().into_iter().flatten().any(|x| x["name"] == "b");
    assert!(listed(&c.status("a")), "A still lists B while its clients' rules drain");
    for n in ["a", "c"] {
        let v = wait_status(&c.sock(n), 20, &format!("{n} to forget B"), |v| !listed(v));
        let other = if n == "a" { "c" } else { "a" };
        let names: BTreeSet<&str> = v["siblings"].as_array().into_iter().flatten().filter_map(|x| x["name"].as_str()).collect();
        assert_eq!(names, BTreeSet::from([other]), "{n} still knows the member that is live");
        let kept = std::fs::read_to_string(c.dir.join(format!("{n}-state")).join("members.json")).expect("the members kept");
        let kept: Vec<serde_json::Value> = serde_json::from_str(&kept).expect("members JSON");
        let names: BTreeSet<&str> = kept.iter().filter_map(|m| m["name"].as_str()).collect();
        assert_eq!(names, BTreeSet::from([other]), "{n} keeps the member left, not B");
    }
}

#[test]
fn a_denied_node_never_joins_and_strangers_datagrams_are_refused() {
    if !require_root() {
        return;
    }
    // C is a server added later, with a certificate of the cluster CA that A denies.
    let mut c = Cluster::with_options(4, &[("a", 100, 50), ("b", 100, 50), ("c", 100, 50)], &gossip(&["c"]));
    let tls = c.dir.join("tls");
    let c_cert = redirector::peer::tls::read_certs(&tls.join("c.pem")).expect("c.pem").remove(0);
    let fp = redirector::peer::tls::fingerprint(&c_cert);
    for n in ["a", "b"] {
        let path = c.dir.join(format!("{n}.toml"));
        let text = std::fs::read_to_string(&path).expect("config");
        let key_line = format!("key = \"{}\"\n", tls.join(format!("{n}.key")).display());
        assert!(text.contains(&key_line), "{text}");
        std::fs::write(&path, text.replace(&key_line, &format!("{key_line}deny = [\"{fp}\"]\n"))).expect("config");
        c.restart(n);
    }
    // A and B come back with the key they kept, and find each other again.
    for n in ["a", "b"] {
        wait_status(&c.sock(n), 30, &format!("{n} to see the other member again"), |v| members(v).len() == 1);
    }
    c.start_again("c", None);
    std::thread::sleep(Duration::from_secs(4));
    let v = c.status("c");
    assert!(v["cluster"].is_null(), "C never got the gossip key, so it gossips nothing: {}", v["cluster"]);
    for n in ["a", "b"] {
        assert_eq!(members(&c.status(n)), ["ab".replace(n, "")], "{n} knows no C");
    }
    assert!(c.log("c").contains("cannot join the cluster yet"), "C says why it is not a member:\n{}", c.log("c"));
    // A datagram not sealed with the key is dropped unread, and counted.
    let before = c.status("a")["cluster"]["refused"].as_u64().expect("refused");
    let a_gossip = SocketAddr::new(IpAddr::V4(c.t.a.v4[0]), 7946);
    in_netns(&c.t.client.ns, move || {
        let s = UdpSocket::bind((client4(1), 0)).expect("bind");
        for _ in 0..5 {
            s.send_to(b"\x01\x01not a member's datagram, and no tag either...........", a_gossip).expect("send");
        }
    });
    wait_status(&c.sock("a"), 5, "A to refuse the stranger's datagrams", |v| v["cluster"]["refused"].as_u64().is_some_and(|r| r >= before + 5));
    assert_eq!(members(&c.status("a")), ["b"], "the stranger did not become a member");
}

/// The proof at netns scale: twelve servers of demo applications (sessions kept) in
/// gossip mode, four of them overloaded by a crowd of busy clients; two servers join later,
/// three volunteers die. Every client stays served, no volunteer ever holds more than its high
/// watermark, and every session continues except those of the clients on the dead servers,
/// which their origins count as lost.
#[test]
fn twelve_servers_lose_three_gain_two_and_four_overloaded_ones_stay_served() {
    if !require_root() {
        return;
    }
    const PER_ORIGIN: u16 = 45;
    let origins = ["a", "b", "c", "s1"];
    let volunteers: Vec<String> = (2..=11).map(|i| format!("s{i}")).collect();
    let mut nodes: Vec<(&str, u64, u64)> = origins.iter().map(|n| (*n, 30, 20)).collect();
    nodes.extend(volunteers.iter().map(|n| (n.as_str(), 30, 20)));
    let mut opts = gossip(&["s10", "s11"]);
    opts.demo = Some(redirector_tests::agents::DemoApp::Rust);
    let mut c = Cluster::with_options(PER_ORIGIN * 4, &nodes, &opts);
    // Each origin's service gets 45 clients: 15 over its high watermark.
    let mut clients = Vec::new();
    for (k, o) in origins.iter().enumerate() {
        let first = u16::try_from(k).expect("four") * PER_ORIGIN + 1;
        clients.extend((first..first + PER_ORIGIN).map(|i| (IpAddr::V4(client4(i)), c.service(o))));
    }
    let crowd = redirector_tests::crowd::Crowd::start(&c.t.client.ns, &clients, Duration::from_secs(120), 100_000);
    let watched: Vec<&str> = volunteers.iter().map(String::as_str).collect();
    let sampler = Sampler::start(&c, &watched);
    for o in origins {
        wait_status(&c.sock(o), 60, &format!("{o} to shed down to its low watermark"), |v| migrated(v).len() >= 20);
    }
    // Two servers join (through A) and are known by all.
    for n in ["s10", "s11"] {
        c.start_again(n, None);
    }
    for n in origins.iter().copied().chain(watched.iter().copied()) {
        wait_status(&c.sock(n), 60, &format!("{n} to know the 13 others"), |v| members(v).len() == 13);
    }
    // The three volunteers holding the most moved clients die.
    let mut on: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for o in origins {
        for (client, to) in migrated(&c.status(o)) {
            on.entry(to).or_default().push(client.parse().expect("client address"));
        }
    }
    let mut by_count: Vec<(String, Vec<IpAddr>)> = on.into_iter().collect();
    by_count.sort_by_key(|(n, v)| (std::cmp::Reverse(v.len()), n.clone()));
    let dead: Vec<String> = by_count.iter().take(3).map(|(n, _)| n.clone()).collect();
    let stranded: BTreeSet<IpAddr> = by_count.iter().take(3).flat_map(|(_, v)| v.iter().copied()).collect();
    assert!(dead.len() == 3 && !stranded.is_empty(), "three volunteers hold moved clients: {by_count:?}");
    for n in &dead {
        c.kill_agent(n);
        c.host(n).ip(&["link", "set", "eth0", "down"]);
    }
    // Their clients come home (their sessions there are lost), the cluster forgets them, and
    // the origins shed again to the members left, the new ones included.
    for o in origins {
        wait_status(&c.sock(o), 30, &format!("{o} to take the dead volunteers' clients home"), |v| migrated(v).iter().all(|m| !dead.contains(&m.1)));
        wait_status(&c.sock(o), 30, &format!("{o} to hold the three dead"), |v| members(v).len() == 10);
        // Settled: each of its clients has one connection, here or moved (the stranded ones
        // reconnected once their requests to the dead timed out), and it is under its high
        // watermark again, shedding to the members left. An origin with room may volunteer for
        // another: the connections of the clients it adopted are not its own.
        wait_status(&c.sock(o), 90, &format!("{o} to shed again and settle"), |v| {
            let load = v["load"].as_u64().unwrap_or(u64::MAX);
            let adopted: u64 = v["adopted"].as_array().into_iter().flatten().map(|a| a["connections"].as_u64().unwrap_or(0)).sum();
            load <= 30 && load.saturating_sub(adopted) + migrated(v).len() as u64 == u64::from(PER_ORIGIN) && v["shedding"] == false
        });
    }
    std::thread::sleep(Duration::from_secs(2));
    let lost: u64 = origins.iter().map(|o| c.status(o)["sessions_lost"].as_u64().unwrap_or(0)).sum();
    let now_on: HashMap<String, usize> = origins.iter().flat_map(|o| migrated(&c.status(o))).fold(HashMap::new(), |mut m, (_, to)| {
        *m.entry(to).or_default() += 1;
        m
    });
    let samples = sampler.stop();
    let served = crowd.finish();
    // Every client's last request, on a fresh connection, was answered; every session that
    // was not on a dead server is continuous.
    for cl in &served {
        assert!(cl.last_server.is_some() && cl.answered > 0, "{} was served at the end: {}", cl.src, cl.history());
        if !stranded.contains(&cl.src) {
            assert!(cl.intact(), "a client that was on no dead server kept its session: {}", cl.history());
        }
    }
    assert_eq!(lost, u64::try_from(stranded.len()).expect("count"), "the origins count the sessions of the clients on the dead servers as lost");
    for n in watched.iter().filter(|n| !dead.iter().any(|d| d == *n)) {
        let (max, count) = max_load(&samples[*n]);
        assert!(count > 10 && max <= 30, "{n} never went over its high watermark (30): max {max} in {count} samples");
        for v in &samples[*n] {
            let committed = v["load"].as_u64().unwrap_or(0) + v["promised"].as_u64().unwrap_or(0);
            assert!(committed <= 30, "{n} never promised past its high watermark: {v}");
        }
    }
    // Whether the servers that joined were drawn is chance (three of the members with room are
    // asked): said, not asserted.
    eprintln!("clients on each volunteer at the end: {now_on:?}; {} stranded on the dead {dead:?}", stranded.len());
}
