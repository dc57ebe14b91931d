//! Agents under stress: a restarted origin, clients that come back late, a volunteer busy with
//! a slow import, load between the watermarks. Each test states the invariant it guards and
//! samples it over time rather than in one snapshot.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redirector::peer::{Answer, MovedClient, Request};
use redirector_sdk::{Hook, Sessions};
use redirector_tests::{
    agents::{Cluster, Sampler, max_load, migrated, open, served_by, wait_log, wait_status},
    net::{SERVICE4, SERVICE4_B, SERVICE4_C, client4},
    peer::{connect_as, read_answer, send},
    require_root,
};

fn svc(ip: std::net::Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), 80)
}

fn clients_to(v: &serde_json::Value, to: &str) -> BTreeSet<String> {
    migrated(v).into_iter().filter(|m| m.1 == to).map(|m| m.0).collect()
}

#[test]
fn restarting_the_origin_agent_keeps_its_clients_steered() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(40, &[("a", 20, 10), ("b", 40, 30)]);
    let conns = open(&c, 1..=30, svc(SERVICE4));
    let a = wait_status(&c.sock("a"), 30, "A to move 20 clients to B", |v| migrated(v).len() >= 20);
    let mut moved = clients_to(&a, "b");
    drop(conns);
    // Outside the agent, an operator drains one rule, removes another, and adds one to a
    // target that is no sibling. The agent notices (its view is reconciled with the kernel)
    // and B is told it can forget the two clients.
    let drained = moved.pop_first().expect("a moved client");
    let removed = moved.pop_first().expect("another moved client");
    c.t.redirector_ok(&c.t.a, &["rule", "del", &drained, "--drain", "60"]);
    c.t.redirector_ok(&c.t.a, &["rule", "del", &removed, "--now"]);
    let orphan = client4(39).to_string();
    c.t.redirector_ok(&c.t.a, &["rule", "add", &orphan, "--to", "198.18.0.99", "--no-probe"]);
    let a = wait_status(&c.sock("a"), 10, "A to notice the rules changed outside it", |v| clients_to(v, "b") == moved && v["orphaned"].as_array().is_some_and(|o| o.len() == 1));
    assert_eq!(a["draining"], 1, "A counts the draining rule: {a}");
    wait_status(&c.sock("b"), 10, "B to be told it can forget the two clients", |v| {
        let adopted: BTreeSet<String> = redirector_tests::agents::adopted(v).into_iter().collect();
        adopted == moved
    });
    // The origin's agent crashes and comes back (a new version would): B stays up all along.
    let links = c.t.bpffs.join("redirector").join(&c.t.a.ns).join("links");
    let ingress = std::fs::read_dir(&links)
        .expect("A's links")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("tc-ingress-")))
        .expect("A's pinned ingress link");
    let program_before = redirector_tests::net::pinned_link_program(&ingress);
    c.restart("a");
    let sampler = Sampler::start(&c, &["a"]);
    // Liveness is 1.5 s: give the new agent twice that to (wrongly) give up on B.
    std::thread::sleep(Duration::from_millis(3500));
    let samples = sampler.stop();
    let samples = &samples["a"];
    assert!(samples.len() > 20, "A's new agent answered its status: {} samples", samples.len());
    for v in samples {
        assert_eq!(clients_to(v, "b"), moved, "A's new agent re-adopted every active rule to B, and only those, and kept them: {v}");
    }
    let v = samples.last().expect("a sample");
    assert_eq!(v["orphaned"][0]["prefix"], format!("{orphan}/32"), "the rule to a stranger is reported, not managed: {v}");
    assert!(c.log("a").contains("not a known sibling"), "and logged:\n{}", c.log("a"));
    let rules = c.rules("a");
    let state = |client: &str| rules.iter().find(|r| r["prefix"] == format!("{client}/32")).map(|r| r["state"].as_str().unwrap_or_default().to_string());
    for m in &moved {
        assert_eq!(state(m).as_deref(), Some("active"), "{m}'s rule was not drained by the restart: {rules:?}");
    }
    assert_eq!(state(&drained).as_deref(), Some("draining"), "the draining rule keeps draining: {rules:?}");
    assert_eq!(state(&removed), None, "{rules:?}");
    assert!(!c.log("a").contains("liveness"), "A's new agent never declared B dead:\n{}", c.log("a"));
    // New connections of the moved clients are still served by the volunteer.
    let conns = open(&c, 1..=30, svc(SERVICE4));
    for (i, _, who) in &conns {
        let expected = if moved.contains(&client4(*i).to_string()) { "B" } else { "A" };
        assert_eq!(who, expected, "client {} is served by {expected} after A's restart", client4(*i));
    }
    let v = wait_status(&c.sock("a"), 10, "B up in A's new agent", |v| v["siblings"][0]["up"] == true);
    assert_eq!(v["siblings"][0]["name"], "b");
    // The new agent put its own programs in the same pinned link (the steering above held).
    assert_ne!(redirector_tests::net::pinned_link_program(&ingress), program_before, "A's new agent swapped in its program");
}

#[test]
fn a_volunteer_keeps_room_for_moved_clients_that_reconnect_late() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(70, &[("a", 20, 10), ("b", 20, 10), ("c", 20, 10)]);
    // C is at its high watermark (no room to offer, not over it either).
    let mut c_conns = open(&c, 41..=60, svc(SERVICE4_C));
    wait_status(&c.sock("c"), 10, "C's load counted", |v| v["load"] == 20);
    // A goes over: only B has room, for 20 connections, and takes 20 of A's clients.
    let a_conns = open(&c, 1..=30, svc(SERVICE4));
    let a = wait_status(&c.sock("a"), 30, "A to move 20 clients", |v| migrated(v).len() >= 20);
    let to_b = clients_to(&a, "b");
    assert_eq!(to_b.len(), 20, "B took all of A's moved clients (C had no room): {a}");
    // The moved clients go quiet: their connections close and they do not come back for
    // longer than any short settling period (10 s).
    let (moved, stay): (Vec<_>, Vec<_>) = a_conns.into_iter().partition(|(i, _, _)| to_b.contains(&client4(*i).to_string()));
    drop(moved);
    std::thread::sleep(Duration::from_secs(11));
    // Now C goes over its high watermark and asks for help: B must not offer the room it
    // promised to A's clients.
    let sampler = Sampler::start(&c, &["b"]);
    c_conns.extend(open(&c, 61..=70, svc(SERVICE4_C)));
    wait_status(&c.sock("c"), 20, "C to shed what it can", |v| !migrated(v).is_empty());
    std::thread::sleep(Duration::from_secs(2));
    let cv = c.status("c");
    assert!(clients_to(&cv, "b").is_empty(), "B offered C room it had promised to A's clients: {cv}");
    assert!(c.log("b").contains("declining"), "B logged why it declined:\n{}", c.log("b"));
    // Everyone reconnects: A's moved clients land on B, C's on A; B stays within its room.
    drop(stay);
    drop(c_conns);
    std::thread::sleep(Duration::from_millis(300));
    let all_a = open(&c, 1..=30, svc(SERVICE4));
    let all_c = open(&c, 41..=70, svc(SERVICE4_C));
    assert_eq!(served_by(&all_a).get("B"), Some(&20), "A's moved clients came back, to B");
    std::thread::sleep(Duration::from_millis(500));
    let samples = sampler.stop();
    let (max, n) = max_load(&samples["b"]);
    assert!(n > 10 && max <= 20, "B never went over its high watermark (20): max {max} in {n} samples");
    drop(all_c);
}

/// Sessions for the slow-import test: exports one small blob per client; imports take
/// `import_delay`.
struct SlowSessions {
    import_delay: Duration,
    events: Mutex<Vec<String>>,
}

impl Sessions for SlowSessions {
    fn export(&self, handoff: &str, clients: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
        self.events.lock().expect("lock").push(format!("export {handoff}"));
        clients.iter().map(|c| (*c, b"session".to_vec())).collect()
    }
    fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
        self.events.lock().expect("lock").push(format!("import {handoff} {}", sessions.len()));
        std::thread::sleep(self.import_delay);
        Ok(())
    }
    fn commit(&self, handoff: &str) {
        self.events.lock().expect("lock").push(format!("commit {handoff}"));
    }
    fn abort(&self, handoff: &str) {
        self.events.lock().expect("lock").push(format!("abort {handoff}"));
    }
}

#[test]
fn a_slow_import_does_not_make_a_busy_sibling_look_dead() {
    if !require_root() {
        return;
    }
    // Imports take twice the liveness timeout (1.5 s); the origin waits for them.
    let c = Cluster::with_config(80, &[("a", 30, 20), ("b", 30, 20)], "negotiate_timeout_ms = 10000\napp_timeout_ms = 10000\n");
    let a_app = Arc::new(SlowSessions { import_delay: Duration::ZERO, events: Mutex::default() });
    let b_app = Arc::new(SlowSessions { import_delay: Duration::from_secs(3), events: Mutex::default() });
    let _ha = Hook::start(c.dir.join("a-app.sock"), svc(SERVICE4), a_app);
    let _hb = Hook::start(c.dir.join("b-app.sock"), svc(SERVICE4_B), b_app.clone());
    std::thread::sleep(Duration::from_millis(700));
    // First B sheds 20 of its clients to A: B now has rules pointing at A.
    let b_conns = open(&c, 41..=80, svc(SERVICE4_B));
    let b = wait_status(&c.sock("b"), 30, "B to move 20 clients to A", |v| migrated(v).len() >= 20);
    let b_moved = clients_to(&b, "a");
    drop(b_conns);
    wait_status(&c.sock("b"), 10, "B's load to drop", |v| v["load"] == 0);
    // Then A sheds to B, whose application takes 3 s to import: B is busy but healthy, and
    // so is A, which keeps sending heartbeats all along.
    let sampler = Sampler::start(&c, &["a", "b"]);
    let t0 = Instant::now();
    let _a_conns = open(&c, 1..=40, svc(SERVICE4));
    wait_status(&c.sock("a"), 30, "A's hand-over to B to commit", |v| !clients_to(v, "b").is_empty());
    assert!(t0.elapsed() > Duration::from_secs(3), "the import really was slow ({:?})", t0.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let samples = sampler.stop();
    for v in &samples["b"] {
        assert_eq!(clients_to(v, "a"), b_moved, "B kept its rules to A while importing: {v}");
        assert_eq!(v["siblings"][0]["up"], true, "B saw A up all along: {v}");
    }
    for v in &samples["a"] {
        assert_eq!(v["siblings"][0]["up"], true, "A saw B up all along: {v}");
    }
    assert!(!c.log("b").contains("liveness"), "B never declared A dead:\n{}", c.log("b"));
    assert!(c.log("a").contains("hand-over committed"), "A's hand-over went through:\n{}", c.log("a"));
    assert!(b_app.events.lock().expect("lock").iter().any(|e| e.starts_with("commit")), "B's application committed the import");
}

#[test]
fn load_between_the_watermarks_does_not_shed_and_above_high_sheds_down_to_low() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(40, &[("a", 20, 10), ("b", 100, 80)]);
    // 15 connections: above low (10), not above high (20): nothing happens.
    let first = open(&c, 1..=15, svc(SERVICE4));
    wait_status(&c.sock("a"), 10, "A's load counted", |v| v["load"] == 15);
    std::thread::sleep(Duration::from_secs(2));
    let v = c.status("a");
    assert!(migrated(&v).is_empty(), "no shedding between the watermarks: {v}");
    assert!(!c.log("a").contains("asking siblings"), "no round started:\n{}", c.log("a"));
    // 25: above high. A sheds, and down to low exactly: 15 clients of one connection each.
    let second = open(&c, 16..=25, svc(SERVICE4));
    wait_status(&c.sock("a"), 20, "A to shed", |v| migrated(v).len() >= 15);
    std::thread::sleep(Duration::from_secs(3));
    let v = c.status("a");
    assert_eq!(migrated(&v).len(), 15, "A shed down to its low watermark (10 of 25 stay), not less, not more: {v}");
    assert!(c.log("a").contains("over the high watermark"), "{}", c.log("a"));
    drop(first);
    drop(second);
    std::thread::sleep(Duration::from_millis(300));
    let all = open(&c, 1..=25, svc(SERVICE4));
    let by = served_by(&all);
    assert_eq!((by.get("A"), by.get("B")), (Some(&10), Some(&15)), "A keeps its low watermark's worth: {by:?}");
}

#[test]
fn rounds_that_move_nothing_back_off_and_say_why() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(50, &[("a", 20, 10), ("b", 20, 10)]);
    // B is full with clients of its own: it can never help.
    let _b = open(&c, 31..=50, svc(SERVICE4_B));
    wait_status(&c.sock("b"), 10, "B's load counted", |v| v["load"] == 20);
    let t0 = Instant::now();
    let _a = open(&c, 1..=25, svc(SERVICE4));
    std::thread::sleep(Duration::from_secs(7).saturating_sub(t0.elapsed()));
    let log = c.log("a");
    let rounds = log.matches("asking siblings for help").count();
    // Without back-off a round starts every ~0.5 s (about 13 in 7 s); with it: 0, ~1, ~2.5,
    // ~5 s.
    assert!((2..=5).contains(&rounds), "{rounds} rounds in 7 s:\n{log}");
    assert!(log.contains("declined: no room"), "A logs why B declined:\n{log}");
    assert!(log.contains("backing off"), "and that it backs off:\n{log}");
    assert!(migrated(&c.status("a")).is_empty());
}

#[test]
fn a_volunteer_over_its_watermark_gives_adopted_clients_back_and_moves_only_its_own() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(60, &[("a", 20, 10), ("b", 30, 20), ("c", 100, 80)]);
    // A sheds to B (the first of two equal offers).
    let a_conns = open(&c, 1..=30, svc(SERVICE4));
    let a = wait_status(&c.sock("a"), 30, "A to move its clients", |v| migrated(v).len() >= 20);
    let to_b = clients_to(&a, "b");
    assert!(to_b.len() >= 10, "B adopted most of A's moved clients: {a}");
    // They reconnect: B now serves them, through A's tunnel.
    drop(a_conns);
    std::thread::sleep(Duration::from_millis(300));
    let _a_conns = open(&c, 1..=30, svc(SERVICE4));
    let adopted_n = u64::try_from(to_b.len()).expect("small");
    wait_status(&c.sock("b"), 10, "B's load to count the adopted clients", |v| v["load"] == adopted_n);
    // Then B's own clients drive it over its high watermark: it gives adopted clients back to
    // their origin first (it cannot steer them: their packets come through A's tunnel), and
    // moves out only clients of its own.
    let sampler = Sampler::start(&c, &["b"]);
    let own: BTreeSet<String> = (41..=55).map(|i| client4(i).to_string()).collect();
    let _b_conns = open(&c, 41..=55, svc(SERVICE4_B));
    let b = wait_status(&c.sock("b"), 20, "B to give adopted clients back", |v| redirector_tests::agents::adopted(v).len() < to_b.len());
    std::thread::sleep(Duration::from_secs(2));
    for v in &sampler.stop()["b"] {
        let out: BTreeSet<String> = migrated(v).into_iter().map(|m| m.0).collect();
        let adopted: BTreeSet<String> = redirector_tests::agents::adopted(v).into_iter().collect();
        assert!(out.is_disjoint(&adopted), "no client is both adopted and moved out: {v}");
        assert!(out.is_subset(&own), "B moved only clients of its own: {v}");
    }
    // The clients that came home connect to A again (their open connections stay on B while
    // their rules drain): A goes over its high watermark and sheds others to C (B has no
    // room, and those home may go back to B only). Where its rules say is read once A settled.
    let again = open(&c, 1..=30, svc(SERVICE4));
    let settled = |v: &serde_json::Value| v["shedding"] == false && v["load"].as_u64() <= Some(20);
    wait_status(&c.sock("a"), 20, "A to settle under its high watermark", settled);
    // Its load is sampled: settled still once it has surely seen every new connection.
    std::thread::sleep(Duration::from_secs(2));
    let a = wait_status(&c.sock("a"), 20, "A to stay settled", settled);
    assert!(a["handoffs"]["handed_back"].as_u64().is_some_and(|n| n > 0), "A took clients home: {a}");
    drop(again);
    std::thread::sleep(Duration::from_millis(300));
    // Every one of A's clients is served where A's rules say, B never steered any itself.
    let where_now: std::collections::BTreeMap<String, String> = migrated(&c.status("a")).into_iter().collect();
    let last = open(&c, 1..=30, svc(SERVICE4));
    for (i, _, who) in &last {
        let want = where_now.get(&client4(*i).to_string()).map_or("A".to_string(), |to| to.to_uppercase());
        assert_eq!(*who, want, "{} is served where A steers it (B's status: {b})", client4(*i));
    }
}

#[test]
fn a_volunteer_settles_transfers_whose_outcome_never_came() {
    if !require_root() {
        return;
    }
    let c = Cluster::with_config(10, &[("a", 100, 50), ("b", 100, 50)], "handoff_expiry_ms = 1500\n");
    let b_addr = SocketAddr::new(IpAddr::V4(c.t.b.v4[0]), 7470);
    // The test plays origin A on a connection of its own, and never commits nor aborts.
    let mut s = connect_as(&c.t.a.ns, &c.dir.join("tls"), "a", "b", b_addr);
    let transfer = |s: &mut redirector_tests::peer::TlsStream, id: u64, client: u16| {
        send(s, Request::HelpRequest { id, connections: 1, clients: 1 });
        assert!(matches!(read_answer(s), Ok(Answer::Offer { .. })), "B offers room");
        let clients = vec![MovedClient { addr: IpAddr::V4(client4(client)), connections: 1 }];
        send(s, Request::Transfer { id, services: vec![svc(SERVICE4)], tunnel_src: vec![IpAddr::V4(c.t.a.v4[0])], clients });
        send(s, Request::Sealed { id, sessions: Vec::new() });
        match read_answer(s) {
            Ok(Answer::TransferAck { .. }) => {}
            other => panic!("B acknowledges transfer {id}: {other:?}"),
        }
    };
    // Transfer 1: client 5 never arrives. Transfer 2: client 6 does (the operator steers it
    // to B on A), which proves it was steered.
    transfer(&mut s, 1, 5);
    transfer(&mut s, 2, 6);
    c.t.redirector_ok(&c.t.a, &["rule", "add", &client4(6).to_string(), "--to", &c.t.b.v4[0].to_string()]);
    let mut six = redirector_tests::Client::connect(&c.t.client.ns, IpAddr::V4(client4(6)), svc(SERVICE4));
    assert_eq!(six.who(), "B");
    // Transfer 3: clients sent ahead, then no Transfer.
    send(&mut s, Request::HelpRequest { id: 3, connections: 1, clients: 1 });
    assert!(matches!(read_answer(&mut s), Ok(Answer::Offer { .. })));
    send(&mut s, Request::Clients { id: 3, clients: vec![MovedClient { addr: IpAddr::V4(client4(7)), connections: 1 }] });
    // No Commit or Abort comes: B asks A how each ended (A keeps no record of what the test
    // did in its name, so its kernel's rules decide: client 6 is steered to B, client 5 is
    // not), and drops the clients sent ahead of a Transfer that never came after
    // handoff_expiry_ms (1.5 s). It says how each was settled.
    let v = wait_status(&c.sock("b"), 10, "B to settle both transfers", |v| {
        v["handoffs"]["awaiting_outcome"] == 0 && redirector_tests::agents::adopted(v) == vec![client4(6).to_string()] && v["promised"] == 0
    });
    // The clients sent ahead of a Transfer that never came leave no trace in status.
    wait_log(&c, "b", "its Transfer never came", 10);
    assert_eq!(redirector_tests::agents::adopted(&v), vec![client4(6).to_string()], "only the client that arrived stays adopted: {v}");
    assert_eq!(v["promised"], 0, "no room stays promised to a client whose transfer was settled as aborted: {v}");
    assert_eq!(six.who(), "B", "the committed client is still served");
}

#[test]
fn a_volunteer_whose_application_restarts_serves_its_adopted_clients_again() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(40, &[("a", 20, 10), ("b", 40, 30)]);
    let conns = open(&c, 1..=30, svc(SERVICE4));
    let a = wait_status(&c.sock("a"), 30, "A to move clients to B", |v| migrated(v).len() >= 10);
    let moved = clients_to(&a, "b");
    drop(conns);
    let client: std::net::Ipv4Addr = moved.first().expect("a moved client").parse().expect("address");
    // B's application restarts: its old listening socket left the sk_lookup map with it.
    c.restart_app("b");
    let start = std::time::Instant::now();
    loop {
        let served = redirector_tests::app::try_connect(&c.t.client.ns, IpAddr::V4(client), svc(SERVICE4)).ok().and_then(|mut cl| cl.try_who().ok()).map(|w| w.0);
        if served.as_deref() == Some("B") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(6), "B's agent registered the new listener within its 2 s check: last answer {served:?}\n{}", c.log("b"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A task of the agent panics (a bug): the whole agent ends, with the reason in its log, so its
/// service manager restarts it, rather than going on without that task. Restarted, it takes
/// its pinned state over and links up again.
#[test]
fn an_agent_whose_task_panics_ends_so_that_it_is_restarted() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(4, &[("a", 100, 50), ("b", 100, 50)]);
    c.kill_agent("a");
    c.start_again("a", Some("panic-after=1500"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = c.agents.get_mut("a").expect("a").child.try_wait().expect("wait") {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "an agent with a panicked task must end:\n{}", c.log("a"));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "it ended with a failure: {status}");
    assert!(c.log("a").contains("panic: ") && c.log("a").contains("TEST FAULT panic-after"), "it said why:\n{}", c.log("a"));
    c.start_again("a", None);
    wait_status(&c.sock("a"), 15, "A, restarted, to link up with B", |v| v["siblings"][0]["up"] == true);
}
