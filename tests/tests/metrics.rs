//! The agent's `/metrics` and `/healthz` (`metrics_listen`), scraped as Prometheus would
//! while a hand-over is under way and after it, out and back, with the real demo application.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use redirector_tests::{
    agents::{Cluster, DemoApp, NodeOpts, Options},
    net::{client4, in_netns},
    require_root,
};

/// A's metrics address, on the loopback of A's namespace.
const METRICS: &str = "127.0.0.1:9477";

/// `GET path` from A's namespace: the status code and the body.
fn get(c: &Cluster, path: &str) -> (u16, String) {
    let (ns, path) = (c.t.a.ns.clone(), path.to_string());
    in_netns(&ns, move || {
        let mut s = TcpStream::connect(METRICS.parse::<SocketAddr>().expect("address")).expect("connect to the metrics address");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        write!(s, "GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("answer");
        let (head, body) = out.split_once("\r\n\r\n").expect("a head and a body");
        let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status code");
        (code, body.to_string())
    })
}

/// The samples of a scrape, by their name with labels as written (`name{k="v"}`).
fn scrape(c: &Cluster) -> BTreeMap<String, f64> {
    let (code, body) = get(c, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    body.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.rsplit_once(' ')).map(|(k, v)| (k.to_string(), v.parse().expect("a number"))).collect()
}

fn at(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[test]
fn metrics_follow_a_hand_over_out_and_back_and_health_needs_the_application() {
    if !require_root() {
        return;
    }
    // A pauses 3 s before its rules change: a scrape sees the hand-over under way.
    let a = NodeOpts { faults: Some("pause-before-rules=3000".into()), extra: format!("metrics_listen = \"{METRICS}\"\n"), ..NodeOpts::default() };
    let opts = Options { demo: Some(DemoApp::Rust), nodes: [("a".to_string(), a)].into(), ..Options::default() };
    let mut c = Cluster::with_options(4, &[("a", 100, 50), ("b", 100, 50)], &opts);
    assert_eq!(get(&c, "/healthz"), (200, "ok\n".to_string()), "healthy: attached, the application registered");
    let before = scrape(&c);
    assert_eq!(at(&before, "redirector_healthy"), 1.0);
    assert_eq!(at(&before, "redirector_sibling_up{sibling=\"b\"}"), 1.0, "{before:?}");
    assert_eq!(at(&before, "redirector_high_watermark"), 100.0);
    assert!(before.keys().any(|k| k.starts_with("redirector_datapath_packets_total{counter=")), "the datapath's counters: {before:?}");
    assert_eq!(at(&before, "redirector_handoffs_started_total{dir=\"out\"}"), 0.0);

    let x = IpAddr::V4(client4(1));
    let sock = c.sock("a");
    let moving = std::thread::spawn(move || redirector::admin::move_clients(&sock, vec![x], Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(1500));
    let during = scrape(&c);
    assert_eq!(at(&during, "redirector_handoffs_started_total{dir=\"out\"}"), 1.0, "started: {during:?}");
    assert_eq!(at(&during, "redirector_handoffs_committed_total{dir=\"out\"}"), 0.0, "not committed yet");
    assert_eq!(at(&during, "redirector_handoff_clients_in_progress"), 1.0);
    let moved = moving.join().expect("move thread").expect("move");
    assert_eq!(moved.moved, 1, "{moved:?}");
    let after = scrape(&c);
    assert_eq!(at(&after, "redirector_handoffs_committed_total{dir=\"out\"}"), 1.0, "{after:?}");
    assert_eq!(at(&after, "redirector_handoff_clients_total{dir=\"out\"}"), 1.0);
    assert_eq!(at(&after, "redirector_handoff_duration_seconds_count{dir=\"out\"}"), 1.0, "the histogram counts it");
    assert!(at(&after, "redirector_handoff_duration_seconds_sum{dir=\"out\"}") >= 3.0, "it took the 3 s pause at least");
    assert_eq!(at(&after, "redirector_clients_moved_out"), 1.0);
    assert_eq!(at(&after, "redirector_handoff_clients_in_progress"), 0.0);

    std::thread::sleep(redirector::agent::MOVE_DWELL);
    let back = c.give_back("a", &[x]).expect("give-back");
    assert_eq!(back["given_back"], 1, "{back}");
    let home = scrape(&c);
    assert_eq!(at(&home, "redirector_handoffs_committed_total{dir=\"back\"}"), 1.0, "{home:?}");
    assert_eq!(at(&home, "redirector_handoff_duration_seconds_count{dir=\"back\"}"), 1.0);
    assert_eq!(at(&home, "redirector_clients_moved_out"), 0.0);
    assert_eq!(at(&home, "redirector_handoffs_aborted_total{dir=\"out\",stage=\"transfer\"}"), 0.0);

    // Without its application, A's service (sessions = true) cannot move its clients.
    c.apps[c.app_of["a"]].kill();
    let mut health = get(&c, "/healthz");
    for _ in 0..50 {
        if health.0 == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        health = get(&c, "/healthz");
    }
    assert_eq!(health.0, 503, "{health:?}");
    assert!(health.1.contains("no application registered for 198.18.0.10:80"), "{health:?}");
    assert_eq!(at(&scrape(&c), "redirector_healthy"), 0.0);
    assert_eq!(get(&c, "/nothing").0, 404);
}
