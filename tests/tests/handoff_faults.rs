//! Hand-overs that fail: a volunteer killed in the middle of a transfer, an application that
//! answers export with garbage, one that does not answer, sessions over the size limit. Each
//! time: nothing steered, nothing lost, a clear log line.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::net::UnixStream,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redirector_sdk::{Hook, Sessions};
use redirector_tests::{
    agents::{Cluster, DemoApp},
    http::HttpClient,
    net::{SERVICE4, SERVICE4_B, client4},
    require_root,
};

/// Runs `n` keep-alive clients against A for `secs`, checking their sessions; returns them.
fn drive(c: &Cluster, n: u16, secs: u64) -> Vec<HttpClient> {
    let dst = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let mut clients: Vec<HttpClient> = (1..=n).map(|i| HttpClient::new(&c.t.client.ns, IpAddr::V4(client4(i)), dst)).collect();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0;
    while Instant::now() < end && rounds < 2000 {
        for cl in &mut clients {
            cl.request();
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    clients
}

fn assert_nothing_lost(clients: &[HttpClient]) {
    let failures: Vec<&String> = clients.iter().flat_map(|c| &c.failures).collect();
    assert!(failures.is_empty(), "requests failed or sessions broke: {failures:?}");
    for cl in clients {
        assert_eq!(cl.servers.keys().collect::<Vec<_>>(), vec!["A"], "{} stayed on A", cl.src);
        assert_eq!(cl.last, Some(cl.requests), "{}'s session counted every request exactly once", cl.src);
    }
}

fn assert_nothing_steered(c: &Cluster) {
    let v = c.status("a");
    assert_eq!(v["migrated_out"].as_array().map(Vec::len), Some(0), "nothing steered: {v}");
    let rules = c.t.redirector_ok(&c.t.a, &["rule", "list", "--json"]);
    assert!(rules.contains("\"rules\":[]"), "no rule installed: {rules}");
}

/// The volunteer's application, slow to import, recording what it is asked.
#[derive(Default)]
struct SlowImporter {
    events: Mutex<Vec<String>>,
}

impl Sessions for SlowImporter {
    fn export(&self, _: &str, _: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
        Vec::new()
    }
    fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
        self.events.lock().expect("lock").push(format!("import {handoff} {}", sessions.len()));
        std::thread::sleep(Duration::from_secs(3));
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
fn a_volunteer_killed_mid_transfer_loses_nothing_and_steers_nothing() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::with_demo_app(DemoApp::Rust, 40, &[("a", 20, 10), ("b", 100, 80)]);
    // B's application is replaced on its hook by one that takes 3 s to import.
    let slow = Arc::new(SlowImporter::default());
    let _hook = Hook::start(c.dir.join("b-app.sock"), SocketAddr::new(IpAddr::V4(SERVICE4_B), 80), slow.clone());
    std::thread::sleep(Duration::from_millis(700));
    let killer = {
        let slow = slow.clone();
        let pid = c.agents["b"].child.id();
        std::thread::spawn(move || {
            // Kill B's agent as soon as the import started.
            let start = Instant::now();
            while !slow.events.lock().expect("lock").iter().any(|e| e.starts_with("import")) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(i32::try_from(pid).expect("pid"), libc::SIGKILL) };
        })
    };
    let clients = drive(&c, 30, 4);
    killer.join().expect("killer");
    c.agents.get_mut("b").expect("b").kill();
    assert!(slow.events.lock().expect("lock").iter().any(|e| e.starts_with("import")), "B started importing");
    assert_nothing_lost(&clients);
    assert_nothing_steered(&c);
    // The partial import was discarded: the application's hook saw the agent go and aborted.
    let start = Instant::now();
    while !slow.events.lock().expect("lock").iter().any(|e| e.starts_with("abort")) {
        assert!(start.elapsed() < Duration::from_secs(5), "the import was never discarded: {:?}", slow.events.lock().expect("lock"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(c.log("a").contains("nothing steered"), "A logged why: {}", c.log("a"));
}

/// A misbehaving application on A's hook: `answer` decides what it says to an export.
fn bad_app(sock: &std::path::Path, answer: impl Fn(u64) -> Option<String> + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let stream = UnixStream::connect(sock).expect("connect to A's hook");
    let mut w = stream.try_clone().expect("clone");
    writeln!(w, "{}", serde_json::json!({"op": "register", "service": SocketAddr::new(IpAddr::V4(SERVICE4), 80).to_string()})).expect("register");
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let op = v["op"].as_str().unwrap_or_default().to_string();
            s.lock().expect("lock").push(op.clone());
            let id = v["id"].as_u64().unwrap_or(0);
            let reply = match op.as_str() {
                "export" => answer(id),
                "registered" => None,
                _ => Some(serde_json::json!({"id": id, "ok": true}).to_string()),
            };
            if let Some(r) = reply {
                let _ = writeln!(w, "{r}");
            }
        }
    });
    seen
}

fn misbehaving_export(answer: impl Fn(u64) -> Option<String> + Send + 'static, log_says: &str) {
    let c = Cluster::with_demo_app(DemoApp::Rust, 40, &[("a", 20, 10), ("b", 100, 80)]);
    let seen = bad_app(&c.dir.join("a-app.sock"), answer);
    std::thread::sleep(Duration::from_millis(300));
    let clients = drive(&c, 30, 4);
    assert_nothing_lost(&clients);
    assert_nothing_steered(&c);
    assert!(c.log("a").contains(log_says), "A's log says {log_says:?}:\n{}", c.log("a"));
    let seen = seen.lock().expect("lock");
    assert!(seen.iter().any(|o| o == "export") && seen.iter().any(|o| o == "abort"), "the application was asked to export, then told to abort: {seen:?}");
}

#[test]
fn an_export_answered_with_garbage_aborts_the_hand_over() {
    if require_root() {
        misbehaving_export(
            |id| Some(serde_json::json!({"id": id, "ok": true, "sessions": [{"client": "198.18.1.1", "blob": "%%% not base64 %%%"}]}).to_string()),
            "not base64",
        );
    }
}

#[test]
fn an_export_that_times_out_aborts_the_hand_over() {
    if require_root() {
        misbehaving_export(|_| None, "did not answer within");
    }
}

#[test]
fn sessions_over_the_size_limit_are_refused() {
    if require_root() {
        use base64::Engine as _;
        let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 300 << 10]);
        misbehaving_export(
            move |id| Some(serde_json::json!({"id": id, "ok": true, "sessions": [{"client": "198.18.1.1", "blob": big}]}).to_string()),
            "over the limit",
        );
    }
}
