//! Hand-backs that fail, and siblings that are only suspected, with the real demo
//! applications and real agents: agents killed at each step of a hand-back, on both sides,
//! before and after the commit point (the origin withdrawing its rules); a draining rule and a
//! failed probe; a volunteer slower to reconnect than the liveness timeout; a volunteer that is
//! silent but reachable; one that stays unreachable; an origin stopped with too little time to
//! take its clients home. Each time: nothing lost, nothing live in two places (every request
//! answered and every session counter continuous, also on a fresh connection at the end),
//! except the sessions of a volunteer that stayed unreachable, which are counted.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use redirector_tests::{
    agents::{Cluster, DemoApp, NodeOpts, Options, migrated, moved_to, wait_log, wait_shed, wait_status},
    crowd::Crowd,
    http::HttpClient,
    net::{SERVICE4, client4},
    require_root,
};
use serde_json::Value;

/// A's application waits this long on a frozen session before answering 503: longer than any
/// agent restart here.
fn patient() -> Vec<String> {
    vec!["--freeze-wait-ms".into(), "30000".into()]
}

/// A demo cluster: A (watermarks 20/10) and B (100/80), patient applications, these agent
/// test faults.
fn cluster(a_faults: Option<&str>, b_faults: Option<&str>, extra: &str) -> Cluster {
    cluster_with(a_faults, b_faults, extra, false)
}

/// [`cluster`], open connections moving with their clients if `live_moves`.
fn cluster_with(a_faults: Option<&str>, b_faults: Option<&str>, extra: &str, live_moves: bool) -> Cluster {
    let node = |f: Option<&str>| NodeOpts { faults: f.map(str::to_string), app_args: patient(), ..NodeOpts::default() };
    let opts = Options {
        demo: Some(DemoApp::Rust),
        extra: extra.to_string(),
        live_moves,
        nodes: [("a".to_string(), node(a_faults)), ("b".to_string(), node(b_faults))].into_iter().collect(),
        ..Options::default()
    };
    Cluster::with_options(40, &[("a", 20, 10), ("b", 100, 80)], &opts)
}

/// 30 busy clients of A's service.
fn crowd(c: &Cluster) -> Crowd {
    let dst = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let clients: Vec<(IpAddr, SocketAddr)> = (1..=30).map(|i| (IpAddr::V4(client4(i)), dst)).collect();
    Crowd::start(&c.t.client.ns, &clients, Duration::from_secs(90), 20_000)
}

/// The clients A moved to B, once it has moved at least 10 and stopped shedding.
fn moved_to_b(c: &Cluster) -> Vec<IpAddr> {
    let a = wait_shed(&c.sock("a"), 10, 30, "A to move clients to B and stop shedding");
    migrated(&a).into_iter().map(|(c, _)| c.parse().expect("address")).collect()
}

/// Waits until A's rules for `clients` are all in `state`.
fn wait_rules_of(c: &Cluster, clients: &[IpAddr], state: &str, secs: u64) {
    let want: HashSet<String> = clients.iter().map(|c| format!("{c}/{}", if c.is_ipv4() { 32 } else { 128 })).collect();
    let start = Instant::now();
    loop {
        let r = c.rules("a");
        let n = r.iter().filter(|r| r["state"] == state && r["prefix"].as_str().is_some_and(|p| want.contains(p))).count();
        if n == want.len() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "timed out waiting for the rules of {} clients to be {state}: {r:?}", want.len());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Both agents have settled everything: no hand-over undecided, awaiting an outcome, held, or
/// unconfirmed by an application.
fn wait_settled(c: &Cluster, secs: u64) {
    for n in ["a", "b"] {
        wait_status(&c.sock(n), secs, &format!("{n} to settle every hand-over"), |v| {
            let h = &v["handoffs"];
            h["undecided"] == 0 && h["awaiting_outcome"] == 0 && h["clients_in_progress"] == 0 && v["hook"]["unconfirmed"] == 0
        });
    }
}

/// Asks A's agent to give `clients` back, on a thread (it may not answer before the test goes
/// on).
fn give_back_later(c: &Cluster, clients: &[IpAddr]) -> std::thread::JoinHandle<Result<Value, String>> {
    let (sock, clients) = (c.sock("a"), clients.to_vec());
    std::thread::spawn(move || {
        let mut args: Vec<String> = vec!["give-back".into()];
        args.extend(clients.iter().map(ToString::to_string));
        let out = std::process::Command::new(redirector_tests::net::redirector_bin()).args(&args).arg("--socket").arg(sock).arg("--json").output().expect("run");
        if out.status.success() { serde_json::from_slice(&out.stdout).map_err(|e| e.to_string()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
    })
}

/// Restarts an agent with `faults` once the clients moved (the hand-over out stays as it is:
/// A's rules are pinned) and waits for it to see its sibling and its application again.
fn restart_with(c: &mut Cluster, name: &str, faults: Option<&str>) {
    c.kill_agent(name);
    c.start_again(name, faults);
    wait_status(&c.sock(name), 30, &format!("{name} to see its sibling and its application again"), |v| {
        v["siblings"].as_array().is_some_and(|s| s.iter().all(|x| x["up"] == true)) && v["hook"]["registered"].as_array().is_some_and(|r| !r.is_empty())
    });
}

#[test]
fn a_volunteer_killed_while_exporting_a_hand_back_keeps_its_clients_with_their_sessions() {
    if !require_root() {
        return;
    }
    let mut c = cluster(None, Some("pause-after-export=60000"), "");
    let crowd = crowd(&c);
    let moved = moved_to_b(&c);
    let asked = give_back_later(&c, &moved);
    // B froze the clients and holds their sessions, then dies before answering.
    wait_status(&c.sock("b"), 20, "B to export for the hand-back", |v| v["handoffs"]["clients_in_progress"].as_u64() >= Some(10));
    c.kill_agent("b");
    let answer = asked.join().expect("give-back thread");
    assert!(answer.is_err(), "nothing came home: {answer:?}");
    assert_eq!(moved_to(&c.status("a")).len(), moved.len(), "A still steers every client to B");
    wait_rules_of(&c, &moved, "active", 5);
    // B's agent comes back: its application reports the unfinished export, B asks A, which
    // aborted: the clients unfreeze and carry on on B.
    c.start_again("b", None);
    wait_settled(&c, 30);
    std::thread::sleep(Duration::from_secs(1));
    let clients = crowd.finish_where_steered("A", || moved_to(&c.status("a")));
    c.assert_intact(&clients);
}

#[test]
fn the_origin_killed_after_importing_a_hand_back_aborts_it_when_it_restarts() {
    if !require_root() {
        return;
    }
    let mut c = cluster(None, None, "");
    let crowd = crowd(&c);
    let moved = moved_to_b(&c);
    restart_with(&mut c, "a", Some("pause-before-rules=60000"));
    let _asked = give_back_later(&c, &moved);
    // A imported the sessions (tentatively) and stops before withdrawing its rules.
    wait_log(&c, "a", "TEST FAULT pause-before-rules", 20);
    c.kill_agent("a");
    wait_rules_of(&c, &moved, "active", 5);
    c.start_again("a", None);
    // A's records say a hand-back was under way; its rules were never withdrawn: aborted. A's
    // application drops what it imported, B's unfreezes the clients, which stay on B.
    wait_settled(&c, 30);
    std::thread::sleep(Duration::from_secs(1));
    let now = moved_to(&c.status("a"));
    assert!(moved.iter().all(|m| now.get(m).is_some_and(|to| to == "b")), "every client stays on B: {now:?}");
    let clients = crowd.finish_where_steered("A", || moved_to(&c.status("a")));
    c.assert_intact(&clients);
}

/// A, restarted with `pause`, takes five clients home (it stays under its high watermark, so it
/// will not move them out again), and the test waits for the commit point: A's rules for them
/// drain. The give-back's answer comes on the thread returned.
fn five_past_the_commit_point(pause: &str) -> (Cluster, Crowd, Vec<IpAddr>, std::thread::JoinHandle<Result<Value, String>>) {
    let mut c = cluster(None, None, "");
    let crowd = crowd(&c);
    let moved = moved_to_b(&c);
    restart_with(&mut c, "a", Some(pause));
    let five: Vec<IpAddr> = moved.into_iter().take(5).collect();
    let asked = give_back_later(&c, &five);
    wait_rules_of(&c, &five, "draining", 20);
    (c, crowd, five, asked)
}

/// Once everything is settled: the five are home, served by A with their sessions.
fn assert_home(c: &Cluster, crowd: Crowd, home: &[IpAddr]) {
    wait_settled(c, 30);
    std::thread::sleep(Duration::from_secs(1));
    let now = moved_to(&c.status("a"));
    assert!(home.iter().all(|m| !now.contains_key(m)), "every client is home: {now:?}");
    let clients = crowd.finish_where_steered("A", || moved_to(&c.status("a")));
    c.assert_intact(&clients);
    for cl in clients.iter().filter(|cl| home.contains(&cl.src)) {
        assert_eq!(cl.last_server.as_deref(), Some("A"), "{} came home with its session", cl.src);
    }
    assert!(c.status("a")["handoffs"]["handed_back"].as_u64() >= Some(u64::try_from(home.len()).expect("small")), "{}", c.status("a"));
}

#[test]
fn the_origin_killed_after_withdrawing_its_rules_commits_the_hand_back_when_it_restarts() {
    if !require_root() {
        return;
    }
    // A dies at the commit point, before telling anyone. Its records and rules say committed:
    // its application keeps what it imported, B's drops the sessions and closes the clients'
    // connections; their next requests come home.
    let (mut c, crowd, home, _asked) = five_past_the_commit_point("pause-before-commit=60000");
    c.kill_agent("a");
    c.start_again("a", None);
    assert_home(&c, crowd, &home);
}

#[test]
fn the_volunteer_killed_after_the_hand_back_went_through_settles_it_when_it_restarts() {
    if !require_root() {
        return;
    }
    // Past the commit point, B dies before it hears the Commit; A goes on.
    let (mut c, crowd, home, asked) = five_past_the_commit_point("pause-before-commit=3000");
    c.kill_agent("b");
    let answer = asked.join().expect("give-back thread").expect("A took the clients home");
    assert_eq!(answer["given_back"].as_u64(), Some(u64::try_from(home.len()).expect("small")), "{answer}");
    // B's agent comes back: its application reports the export it never saw end, B asks A:
    // committed. B's application drops the sessions and closes those connections.
    c.start_again("b", None);
    assert_home(&c, crowd, &home);
}

/// A client that came home keeps a draining rule to B for a while. Moving it to B again must
/// be decided by the rules this hand-over makes active: when its probe fails, no rule went in,
/// the hand-over aborts and the sessions stay on A (a draining rule sends nothing to B).
#[test]
fn a_draining_rule_and_a_failed_probe_abort_the_hand_over_and_keep_the_sessions() {
    if !require_root() {
        return;
    }
    // The first hand-over's probe succeeds, every later one fails.
    let c = cluster(Some("fail-probe-from=2"), None, "");
    let crowd = crowd(&c);
    let moved = moved_to_b(&c);
    let some: Vec<IpAddr> = moved.iter().take(5).copied().collect();
    let answer = c.give_back("a", &some).expect("give-back");
    assert_eq!(answer["given_back"], 5, "{answer}");
    wait_rules_of(&c, &some, "draining", 5);
    // A client that just moved is not moved again at once.
    std::thread::sleep(redirector::agent::MOVE_DWELL + Duration::from_millis(500));
    // The operator moves them to B again: exported, imported by B, acknowledged; the probe
    // fails.
    let mut args = vec!["move".to_string()];
    args.extend(some.iter().map(ToString::to_string));
    let answer = c.ask_agent("a", &args).expect("move");
    assert_eq!(answer["moved"], 0, "nothing moved: {answer}");
    wait_rules_of(&c, &some, "draining", 5);
    let now = moved_to(&c.status("a"));
    assert!(some.iter().all(|s| !now.contains_key(s)), "A steers none of them: {now:?}");
    wait_settled(&c, 20);
    std::thread::sleep(Duration::from_secs(1));
    let clients = crowd.finish_where_steered("A", || moved_to(&c.status("a")));
    c.assert_intact(&clients);
}

/// After A restarts, B waits 15 s before it links up again (ten times the 1.5 s liveness
/// timeout, and longer than A takes to start): A hears it on its own link all along, so B keeps
/// its clients and their sessions.
#[test]
fn a_volunteer_slower_to_reconnect_than_the_liveness_timeout_keeps_its_clients() {
    if !require_root() {
        return;
    }
    let mut c = cluster(None, Some("reconnect-delay=15000"), "");
    let crowd = crowd(&c);
    let moved = moved_to_b(&c);
    c.kill_agent("a");
    c.start_again("a", None);
    let t0 = Instant::now();
    // Four liveness timeouts of sampling, all before B links up again: nothing comes home,
    // nothing is drained.
    while t0.elapsed() < Duration::from_millis(6000) {
        let a = c.status("a");
        assert_eq!(migrated(&a).len(), moved.len(), "every client stays on B: {a}");
        assert_eq!((a["handoffs"]["handed_back"].as_u64(), a["sessions_lost"].as_u64()), (Some(0), Some(0)), "{a}");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_rules_of(&c, &moved, "active", 1);
    let clients = crowd.finish_where_steered("A", || moved_to(&c.status("a")));
    c.assert_intact(&clients);
}

/// B's agent restarts and sends no heartbeats at all, but answers: A suspects it and takes its
/// clients home with their sessions (no drain, nothing lost).
#[test]
fn a_suspected_but_reachable_volunteer_gives_its_clients_back_with_their_sessions() {
    if !require_root() {
        return;
    }
    let mut c = cluster(None, None, "");
    let crowd = crowd(&c);
    let moved = moved_to_b(&c);
    c.kill_agent("b");
    c.start_again("b", Some("mute-heartbeats"));
    let a = wait_status(&c.sock("a"), 20, "A to take B's clients home", |v| migrated(v).is_empty());
    assert_eq!(a["sessions_lost"], 0, "{a}");
    assert!(a["handoffs"]["handed_back"].as_u64() >= Some(u64::try_from(moved.len()).expect("small")), "{a}");
    wait_settled(&c, 20);
    std::thread::sleep(Duration::from_secs(1));
    let clients = crowd.finish_where_steered("A", || moved_to(&c.status("a")));
    c.assert_intact(&clients);
}

/// B dies for good: A drains its rules, its clients come home without their sessions, and A
/// counts them as lost.
#[test]
fn a_volunteer_that_stays_unreachable_loses_its_sessions_and_they_are_counted() {
    if !require_root() {
        return;
    }
    let mut c = cluster(None, None, "");
    let crowd = crowd(&c);
    let moved = moved_to_b(&c);
    // Each moved client has been answered by B at least once.
    std::thread::sleep(Duration::from_secs(1));
    c.kill_agent("b");
    c.t.b.ip(&["link", "set", "eth0", "down"]);
    let a = wait_status(&c.sock("a"), 20, "A to bring B's clients home", |v| migrated(v).is_empty());
    assert_eq!(a["sessions_lost"].as_u64(), Some(u64::try_from(moved.len()).expect("small")), "every moved client's session is counted lost: {a}");
    assert!(c.log("a").contains("sessions lost"), "and logged:\n{}", c.log("a"));
    std::thread::sleep(Duration::from_secs(1));
    let clients = crowd.finish();
    // The clients that stayed on A lost nothing; each moved one starts a new session on A.
    let lost: HashSet<IpAddr> = moved.iter().copied().collect();
    let (theirs, ours): (Vec<HttpClient>, Vec<HttpClient>) = clients.into_iter().partition(|cl| lost.contains(&cl.src));
    c.assert_intact(&ours);
    for cl in &theirs {
        assert_eq!(cl.last_server.as_deref(), Some("A"), "{} is served by A again", cl.src);
        assert!(cl.breaks.iter().any(|b| b.contains("count 1 ")), "{} started a new session on A: {:?}", cl.src, cl.breaks);
    }
}

/// SIGTERM reaches A while a hand-over out is still in progress (its rules are in, its
/// applications not told yet): A finishes it first, then takes every client home, those of
/// that hand-over too.
#[test]
fn an_origin_stopped_in_the_middle_of_a_hand_over_finishes_it_then_takes_everyone_home() {
    if !require_root() {
        return;
    }
    let mut c = cluster(Some("pause-before-commit=1500"), None, "");
    let crowd = crowd(&c);
    let start = Instant::now();
    while !c.rules("a").iter().any(|r| r["state"] == "active") {
        assert!(start.elapsed() < Duration::from_secs(30), "A never installed rules");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = c.term_agent("a", 20);
    assert!(took < Duration::from_secs(11), "within exit_timeout_ms (10 s): {took:?}");
    let r = c.rules("a");
    assert!(!r.iter().any(|r| r["state"] == "active"), "no rule of A steers anyone any more: {r:?}");
    assert!(c.log("a").contains("every client is home"), "A says it took everyone home:\n{}", c.log("a"));
    std::thread::sleep(Duration::from_secs(1));
    let clients = crowd.finish_where_steered("A", BTreeMap::new);
    c.assert_intact(&clients);
}

/// SIGTERM reaches A when it cannot take its clients home within `exit_timeout_ms` (its
/// hand-back waits 8 s before the rules change; A has 1.5 s). A decides the hand-back from its
/// rules before it exits (none withdrawn: aborted) and tells B, whose application unfreezes the
/// clients at once: they stay on B, steered by A's pinned rules, with their sessions. Left
/// undecided, B's application kept them frozen with no origin left to ask, and their requests
/// waited until they failed. With `live_moves`, the clients' open connections were on their way
/// home, frozen at A: A lets them go before it exits (they stayed frozen for 30 s), and they go
/// on at B.
fn origin_out_of_time(live_moves: bool) {
    let mut c = cluster_with(None, None, "exit_timeout_ms = 1500\n", live_moves);
    let crowd = crowd(&c);
    let moved = moved_to_b(&c);
    restart_with(&mut c, "a", Some("pause-before-rules=8000"));
    let took = c.term_agent("a", 10);
    // 1.5 s, then its last decisions (at most 3 s) and its links' last words (at most 2 s).
    assert!(took < Duration::from_secs(7), "A exited about exit_timeout_ms after SIGTERM, not after the hand-back's 8 s: {took:?}");
    assert!(c.log("a").contains("TEST FAULT pause-before-rules"), "A was taking clients home when its time ran out:\n{}", c.log("a"));
    // The rules are the commit point: none was withdrawn.
    wait_rules_of(&c, &moved, "active", 1);
    // B was told: nothing left to ask A about, no client frozen.
    wait_status(&c.sock("b"), 5, "B to learn that the hand-back aborted", |v| {
        v["handoffs"]["awaiting_outcome"] == 0 && v["handoffs"]["clients_in_progress"] == 0 && v["hook"]["unconfirmed"] == 0
    });
    let on_b: BTreeMap<IpAddr, String> = moved.iter().map(|m| (*m, "b".to_string())).collect();
    let clients = crowd.finish_where_steered("A", || on_b.clone());
    c.assert_intact(&clients);
}

#[test]
fn an_origin_out_of_time_to_take_its_clients_home_aborts_the_hand_back_before_it_exits() {
    if !require_root() {
        return;
    }
    origin_out_of_time(false);
}

#[test]
fn an_origin_out_of_time_to_take_connections_home_lets_them_go_on_where_they_are() {
    if !require_root() {
        return;
    }
    origin_out_of_time(true);
}
