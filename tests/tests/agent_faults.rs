//! Agents under stress: a restarted origin, clients that come back late, a volunteer busy with
//! a slow import, load between the watermarks. Each test states the invariant it guards and
//! samples it over time rather than in one snapshot.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redirector_sdk::{Hook, Sessions};
use redirector_tests::{
    agents::{Cluster, Sampler, max_load, migrated, open, served_by, wait_status},
    net::{SERVICE4, SERVICE4_B, SERVICE4_C, client4},
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
    let moved = clients_to(&a, "b");
    drop(conns);
    // The origin's agent crashes and comes back; B stays up all along.
    c.restart("a");
    let sampler = Sampler::start(&c, &["a"]);
    // Liveness is 1.5 s: give the new agent twice that to (wrongly) give up on B.
    std::thread::sleep(Duration::from_millis(3500));
    let samples = sampler.stop();
    let samples = &samples["a"];
    assert!(samples.len() > 20, "A's new agent answered its status: {} samples", samples.len());
    for v in samples {
        assert_eq!(clients_to(v, "b"), moved, "A's new agent re-adopted every moved client and kept it: {v}");
    }
    let rules: serde_json::Value = serde_json::from_str(&c.t.redirector_ok(&c.t.a, &["rule", "list", "--json"])).expect("rules JSON");
    let rules = rules["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), moved.len(), "every rule is still there: {rules:?}");
    assert!(rules.iter().all(|r| r["state"] == "active"), "nothing was drained by the restart: {rules:?}");
    assert!(!c.log("a").contains("liveness"), "A's new agent never declared B dead:\n{}", c.log("a"));
    // New connections of the moved clients are still served by the volunteer.
    let conns = open(&c, 1..=30, svc(SERVICE4));
    for (i, _, who) in &conns {
        let expected = if moved.contains(&client4(*i).to_string()) { "B" } else { "A" };
        assert_eq!(who, expected, "client {} is served by {expected} after A's restart", client4(*i));
    }
    let v = wait_status(&c.sock("a"), 10, "B up in A's new agent", |v| v["siblings"][0]["up"] == true);
    assert_eq!(v["siblings"][0]["name"], "b");
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
