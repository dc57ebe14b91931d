//! Hand-overs that fail, with the real demo applications (their sessions really freeze,
//! unfreeze, import and drop) and real agents: agents killed at the worst moments and
//! restarted, hooks that drop mid hand-over, a lost Abort, lost session frames, no
//! application registered, applications that answer export with nonsense or not at all,
//! sessions over the limits. Each time: every request answered, every session counter
//! continuous (also on a fresh connection at the end, which would land on any stale copy),
//! and a clear log line. A proxy on the hook (`redirector_tests::hook`) or a test fault in
//! the agent (`REDIRECTOR_TEST_FAULTS`) makes each failure happen.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use redirector_tests::{
    agents::{Cluster, DemoApp, NodeOpts, Options, migrated, moved_to, wait_app_log, wait_log, wait_registered, wait_status},
    hook::{Action, Dir, HookProxy},
    http::HttpClient,
    net::{SERVICE4, client4},
    require_root,
};
use serde_json::{Value, json};

/// A demo cluster: A (watermarks 20/10) and B (100/80), with these node options.
fn cluster(nodes: &[(&str, NodeOpts)], extra: &str) -> Cluster {
    let opts = Options { demo: Some(DemoApp::Rust), extra: extra.to_string(), nodes: nodes.iter().map(|(n, o)| ((*n).to_string(), o.clone())).collect(), ..Options::default() };
    Cluster::with_options(40, &[("a", 20, 10), ("b", 100, 80)], &opts)
}

/// A's application waits this long on a frozen session before answering 503: longer than any
/// agent restart here.
fn patient() -> Vec<String> {
    vec!["--freeze-wait-ms".into(), "30000".into()]
}

/// `n` keep-alive clients of A's service in a loop on a thread, until stopped.
struct Driver {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<HttpClient>>,
}

impl Driver {
    fn start(c: &Cluster, n: u16) -> Self {
        let dst = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
        let ns = c.t.client.ns.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut clients: Vec<HttpClient> = (1..=n).map(|i| HttpClient::new(&ns, IpAddr::V4(client4(i)), dst)).collect();
            while !s.load(Ordering::Relaxed) {
                for cl in &mut clients {
                    cl.request();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            clients
        });
        Self { stop, thread }
    }

    /// Stops; then every client makes one more request on a fresh connection (it lands where
    /// the kernel steers it now, so a session left behind, stale or forked, shows).
    fn stop(self) -> Vec<HttpClient> {
        self.stop.store(true, Ordering::Relaxed);
        let mut clients = self.thread.join().expect("client thread");
        for cl in &mut clients {
            cl.reconnect();
            cl.request();
        }
        clients
    }
}

/// Every request answered, every session continuous, across whatever happened.
fn moved(clients: &[HttpClient]) -> usize {
    clients.iter().filter(|c| c.servers.contains_key("B")).count()
}

fn active_rules(rules: &[Value]) -> usize {
    rules.iter().filter(|r| r["state"] == "active").count()
}

/// Waits up to `secs` for `node`'s rules to satisfy `cond`; returns how many are active then.
fn wait_rules(c: &Cluster, node: &str, secs: u64, what: &str, cond: impl Fn(&[Value]) -> bool) -> usize {
    let start = Instant::now();
    loop {
        let r = c.rules(node);
        if cond(&r) {
            return active_rules(&r);
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}; rules: {r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_nothing_steered(c: &Cluster) {
    let v = c.status("a");
    assert_eq!(v["migrated_out"].as_array().map(Vec::len), Some(0), "nothing steered: {v}");
    let rules = c.t.redirector_ok(&c.t.a, &["rule", "list", "--json"]);
    assert!(rules.contains("\"rules\":[]"), "no rule installed: {rules}");
}

/// The lines of `log` containing `needle`.
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// How many imported sessions an application's `hook: abort` / `hook: commit` lines say it
/// dropped / confirmed in all.
fn imported_sessions(app_log: &str, op: &str) -> usize {
    let word = if op == "abort" { "imported sessions dropped" } else { "imported sessions confirmed" };
    lines_with(app_log, &format!("hook: {op} ")).iter().filter_map(|l| l.split(", ").nth(1)?.strip_suffix(word)?.trim().parse::<usize>().ok()).sum()
}

/// The id of a request line from the agent with this op, if it is one.
fn request_id(line: &str, op: &str) -> Option<u64> {
    let v: Value = serde_json::from_str(line).ok()?;
    (v["op"] == op).then(|| v["id"].as_u64()).flatten()
}

/// The id of an answer line from the application.
fn answer_id(line: &str) -> Option<u64> {
    serde_json::from_str::<Value>(line).ok()?["id"].as_u64()
}

/// A filter that applies `act` to the answers to requests with `op` (the `n`-th such answer
/// gets `act(n, request, answer)`), and forwards everything else.
fn on_answers(op: &'static str, act: impl Fn(usize, &Value, &str) -> Action + Send + Sync + 'static) -> Arc<redirector_tests::hook::Filter> {
    let requests: Mutex<HashMap<u64, Value>> = Mutex::default();
    let n = AtomicUsize::new(0);
    Arc::new(move |dir, line: &str| match dir {
        Dir::ToApp => {
            if let Some(id) = request_id(line, op) {
                requests.lock().expect("lock").insert(id, serde_json::from_str(line).unwrap_or_default());
            }
            Action::Forward
        }
        Dir::ToAgent => {
            let req = answer_id(line).and_then(|id| requests.lock().expect("lock").remove(&id));
            req.map_or(Action::Forward, |req| act(n.fetch_add(1, Ordering::Relaxed), &req, line))
        }
    })
}

#[test]
fn a_volunteer_killed_mid_transfer_loses_nothing_steers_nothing_and_drops_its_import_when_told() {
    if !require_root() {
        return;
    }
    // B's application imports at once, but its answer is held for 3 s: B's agent dies then.
    let b = NodeOpts { hook_via: Some("b-proxy.sock".into()), ..NodeOpts::default() };
    let mut c = cluster(&[("b", b)], "");
    let proxy = HookProxy::start(&c.dir.join("b-proxy.sock"), &c.dir.join("b-app.sock"), on_answers("import", |_, _, _| Action::Delay(Duration::from_secs(3))));
    wait_registered(&c, "b", 10);
    let driver = Driver::start(&c, 30);
    wait_app_log(&c, "b", "hook: import", 20);
    c.kill_agent("b");
    std::thread::sleep(Duration::from_secs(2));
    let clients = driver.stop();
    c.assert_intact(&clients);
    assert_eq!(moved(&clients), 0, "nobody moved");
    assert_nothing_steered(&c);
    assert!(c.log("a").contains("nothing steered"), "A logged why:\n{}", c.log("a"));
    // While its agent is away, B's application keeps what it imported (tentative): it does
    // not decide on its own.
    assert!(!c.app_log("b").contains("hook: abort"), "B's application decided by itself:\n{}", c.app_log("b"));
    // B's agent comes back; the application reports the unfinished import; B asks A, which
    // aborted: the import is dropped.
    c.start_again("b", None);
    wait_app_log(&c, "b", "hook: abort", 30);
    assert!(c.app_log("b").contains("registering with 1 unfinished"), "{}", c.app_log("b"));
    assert!(imported_sessions(&c.app_log("b"), "abort") > 0, "the imported sessions were dropped:\n{}", c.app_log("b"));
    drop(proxy);
}

#[test]
fn a_volunteer_that_acknowledges_too_late_gets_the_abort_and_drops_its_copy() {
    if !require_root() {
        return;
    }
    // B acknowledges 5 s after importing; A waits about 3 s (1 s, plus the import's 2 s).
    let b = NodeOpts { faults: Some("delay-ack=5000".into()), ..NodeOpts::default() };
    let c = cluster(&[("b", b)], "");
    let driver = Driver::start(&c, 30);
    wait_app_log(&c, "b", "hook: abort", 30);
    let clients = driver.stop();
    c.assert_intact(&clients);
    assert_eq!(moved(&clients), 0, "nobody moved");
    assert_nothing_steered(&c);
    assert!(c.log("a").contains("did not answer within"), "A gave up waiting:\n{}", c.log("a"));
    let b_app = c.app_log("b");
    assert!(imported_sessions(&b_app, "abort") > 0, "B's application dropped its copy:\n{b_app}");
    assert!(!b_app.contains("hook: commit"), "{b_app}");
}

#[test]
fn a_lost_abort_is_settled_by_asking_the_origin() {
    if !require_root() {
        return;
    }
    // As above, but A's Abort never reaches B: B asks A how the hand-over ended.
    let a = NodeOpts { faults: Some("drop-abort".into()), ..NodeOpts::default() };
    let b = NodeOpts { faults: Some("delay-ack=5000".into()), ..NodeOpts::default() };
    let c = cluster(&[("a", a), ("b", b)], "");
    let driver = Driver::start(&c, 30);
    wait_log(&c, "a", "TEST FAULT drop-abort", 20);
    wait_app_log(&c, "b", "hook: abort", 30);
    let clients = driver.stop();
    c.assert_intact(&clients);
    assert_nothing_steered(&c);
    assert!(!c.log("b").contains("origin aborted"), "no Abort reached B:\n{}", c.log("b"));
    assert!(imported_sessions(&c.app_log("b"), "abort") > 0, "B's application dropped its copy:\n{}", c.app_log("b"));
}

#[test]
fn the_origin_agent_killed_after_its_rules_went_in_commits_when_it_restarts() {
    if !require_root() {
        return;
    }
    // A stops between installing the rules (the commit point) and telling anyone.
    let a = NodeOpts { faults: Some("pause-before-commit=60000".into()), app_args: patient(), ..NodeOpts::default() };
    let mut c = cluster(&[("a", a)], "");
    let driver = Driver::start(&c, 30);
    let steered = wait_rules(&c, "a", 20, "A's rules to go in", |r| active_rules(r) >= 10);
    c.kill_agent("a");
    // A's application keeps the sessions frozen; requests of those clients wait.
    std::thread::sleep(Duration::from_secs(1));
    assert!(!c.app_log("a").contains("hook: abort"), "A's application decided by itself:\n{}", c.app_log("a"));
    c.start_again("a", None);
    // A's new agent finds the undecided hand-over in its records, the rules say committed; its
    // application is told, and B, which never got a Commit, asks A and settles it too.
    let a = wait_status(&c.sock("a"), 30, "A to settle the hand-over", |v| {
        v["handoffs"]["undecided"] == 0 && v["hook"]["unconfirmed"] == 0 && v["handoffs"]["clients_in_progress"] == 0
    });
    assert!(migrated(&a).len() >= steered, "the steered clients stay moved: {a}");
    wait_status(&c.sock("b"), 30, "B to learn how the hand-over ended", |v| v["handoffs"]["awaiting_outcome"] == 0 && v["hook"]["unconfirmed"] == 0);
    std::thread::sleep(Duration::from_secs(1));
    let clients = driver.stop();
    c.assert_intact(&clients);
    assert!(moved(&clients) >= 10, "clients moved to B with their sessions: {}", moved(&clients));
    assert!(imported_sessions(&c.app_log("b"), "commit") > 0, "{}", c.app_log("b"));
    assert!(!c.app_log("a").contains("hook: abort") && !c.app_log("b").contains("hook: abort"), "nothing aborted");
    assert_eq!(c.status("a")["sessions_lost"], 0, "no session lost: {}", c.status("a"));
}

#[test]
fn the_volunteer_agent_killed_before_its_application_heard_the_commit_confirms_when_it_restarts() {
    if !require_root() {
        return;
    }
    // B's application never hears a commit until `pass` is set; B's agent dies meanwhile.
    // Liveness 10 s: A keeps its clients on B while B's agent restarts.
    let pass = Arc::new(AtomicBool::new(false));
    let b = NodeOpts { hook_via: Some("b-proxy.sock".into()), ..NodeOpts::default() };
    let mut c = cluster(&[("b", b)], "liveness_ms = 10000\n");
    let p = pass.clone();
    let filter =
        Arc::new(move |dir, line: &str| if dir == Dir::ToApp && !p.load(Ordering::Relaxed) && request_id(line, "commit").is_some() { Action::Drop } else { Action::Forward });
    let proxy = HookProxy::start(&c.dir.join("b-proxy.sock"), &c.dir.join("b-app.sock"), filter);
    wait_registered(&c, "b", 10);
    let driver = Driver::start(&c, 30);
    wait_status(&c.sock("a"), 20, "A to commit a hand-over", |v| !migrated(v).is_empty() && v["handoffs"]["clients_in_progress"] == 0);
    wait_status(&c.sock("b"), 10, "B to owe its application the commit", |v| v["hook"]["unconfirmed"].as_u64() >= Some(1));
    c.kill_agent("b");
    std::thread::sleep(Duration::from_secs(1));
    // The moved clients are served by B's application with their imported sessions all along.
    assert!(!c.app_log("b").contains("hook: abort"), "B's application decided by itself:\n{}", c.app_log("b"));
    pass.store(true, Ordering::Relaxed);
    c.start_again("b", None);
    wait_app_log(&c, "b", "hook: commit", 30);
    let clients = driver.stop();
    c.assert_intact(&clients);
    assert!(moved(&clients) >= 10, "clients moved to B with their sessions: {}", moved(&clients));
    assert!(imported_sessions(&c.app_log("b"), "commit") > 0, "B's application confirmed its import:\n{}", c.app_log("b"));
    assert!(!c.app_log("b").contains("hook: abort"), "{}", c.app_log("b"));
    drop(proxy);
}

#[test]
fn hooks_that_drop_and_reconnect_mid_hand_over_lose_nothing() {
    if !require_root() {
        return;
    }
    // A's hook drops right after its export answer, B's right after its import answer.
    let a = NodeOpts { hook_via: Some("a-proxy.sock".into()), ..NodeOpts::default() };
    let b = NodeOpts { hook_via: Some("b-proxy.sock".into()), ..NodeOpts::default() };
    let c = cluster(&[("a", a), ("b", b)], "");
    let cut_once = |n: usize, _: &Value, _: &str| if n == 0 { Action::ForwardThenCut } else { Action::Forward };
    let pa = HookProxy::start(&c.dir.join("a-proxy.sock"), &c.dir.join("a-app.sock"), on_answers("export", cut_once));
    let pb = HookProxy::start(&c.dir.join("b-proxy.sock"), &c.dir.join("b-app.sock"), on_answers("import", cut_once));
    wait_registered(&c, "a", 10);
    wait_registered(&c, "b", 10);
    let driver = Driver::start(&c, 30);
    wait_status(&c.sock("a"), 20, "A to commit a hand-over", |v| !migrated(v).is_empty() && v["handoffs"]["clients_in_progress"] == 0);
    wait_app_log(&c, "a", "hook: commit", 10);
    wait_app_log(&c, "b", "hook: commit", 10);
    std::thread::sleep(Duration::from_secs(1));
    let clients = driver.stop();
    c.assert_intact(&clients);
    assert!(moved(&clients) >= 10, "clients moved to B with their sessions: {}", moved(&clients));
    for n in ["a", "b"] {
        let log = c.app_log(n);
        assert!(log.contains("registering with 1 unfinished"), "{n}'s application reported its unfinished hand-over when it came back:\n{log}");
        assert!(!log.contains("hook: abort"), "{n}'s application decided nothing by itself:\n{log}");
        assert!(c.log(n).matches("application registered").count() >= 2, "{n}'s application registered again");
    }
    assert!(imported_sessions(&c.app_log("b"), "commit") > 0, "{}", c.app_log("b"));
    drop((pa, pb));
}

#[test]
fn lost_session_frames_make_the_volunteer_refuse_the_transfer() {
    if !require_root() {
        return;
    }
    let a = NodeOpts { faults: Some("drop-sessions-frame".into()), ..NodeOpts::default() };
    let c = cluster(&[("a", a)], "");
    let driver = Driver::start(&c, 30);
    wait_log(&c, "a", "TEST FAULT drop-sessions-frame", 20);
    std::thread::sleep(Duration::from_secs(2));
    let clients = driver.stop();
    c.assert_intact(&clients);
    assert_nothing_steered(&c);
    assert!(c.log("b").contains("some were lost or changed on the way"), "B said why it refused:\n{}", c.log("b"));
    assert!(c.log("a").contains("nothing steered"), "{}", c.log("a"));
    assert!(c.app_log("a").contains("hook: abort"), "A's application unfroze its clients:\n{}", c.app_log("a"));
    // B started importing as the sessions came (tentatively): every import it started was
    // aborted, none committed.
    let b_app = c.app_log("b");
    for line in b_app.lines().filter(|l| l.contains("hook: import")) {
        let handoff = line.split_whitespace().nth(2).expect("hook: import HANDOFF:").trim_end_matches(':');
        assert!(b_app.contains(&format!("hook: abort {handoff}:")), "B's application dropped what it imported of {handoff}:\n{b_app}");
    }
    assert!(!b_app.contains("hook: commit"), "B committed nothing:\n{b_app}");
}

#[test]
fn with_sessions_on_no_client_moves_until_an_application_registers() {
    if !require_root() {
        return;
    }
    // A's application connects to a socket that appears only later.
    let a = NodeOpts { hook_via: Some("a-late.sock".into()), ..NodeOpts::default() };
    let c = cluster(&[("a", a)], "");
    let driver = Driver::start(&c, 30);
    wait_status(&c.sock("a"), 20, "A over its high watermark", |v| v["load"].as_u64() > v["high_watermark"].as_u64());
    std::thread::sleep(Duration::from_secs(3));
    assert!(migrated(&c.status("a")).is_empty(), "nothing moved without an application: {}", c.status("a"));
    assert!(c.log("a").contains("keeps sessions (sessions = true) and no application is registered"), "A said why:\n{}", c.log("a"));
    let proxy = HookProxy::start(&c.dir.join("a-late.sock"), &c.dir.join("a-app.sock"), Arc::new(|_, _: &str| Action::Forward));
    wait_registered(&c, "a", 10);
    wait_status(&c.sock("a"), 20, "A to move clients once its application registered", |v| migrated(v).len() >= 10);
    std::thread::sleep(Duration::from_secs(1));
    let clients = driver.stop();
    c.assert_intact(&clients);
    assert!(moved(&clients) >= 10, "clients moved, with their sessions: {}", moved(&clients));
    drop(proxy);
}

/// What the proxy does to the `n`-th export answer, and what the agent that sees it logs.
struct Bad {
    what: &'static str,
    log_says: &'static str,
    /// On B's log rather than A's.
    volunteer: bool,
    /// The spoiled answer to the request, from the real answer's line: a line and the raw
    /// bytes after it.
    answer: fn(&Value, &str) -> (String, Vec<u8>),
}

fn line(s: String) -> (String, Vec<u8>) {
    (s, Vec::new())
}

fn first_client(req: &Value) -> String {
    req["clients"][0].as_str().unwrap_or("198.18.1.1").to_string()
}

fn with_sessions(answer: &str, f: impl FnOnce(&mut Vec<Value>)) -> String {
    let mut v: Value = serde_json::from_str(answer).expect("the demo's answer is JSON");
    let mut s = v["sessions"].as_array().cloned().unwrap_or_default();
    f(&mut s);
    v["sessions"] = Value::Array(s);
    v.to_string()
}

const BAD: &[Bad] = &[
    Bad {
        what: "a session of a client that was not requested",
        log_says: "which was not requested",
        volunteer: false,
        answer: |_, a| line(with_sessions(a, |s| s.push(json!({"client": "198.18.200.1", "blob": ""})))),
    },
    Bad {
        what: "two sessions of one client",
        log_says: "exported two sessions for",
        volunteer: false,
        answer: |r, a| {
            let c = first_client(r);
            line(with_sessions(a, |s| {
                s.retain(|x| x["client"] != c.as_str());
                s.push(json!({"client": c, "blob": "e30="}));
                s.push(json!({"client": c, "blob": "e30="}));
            }))
        },
    },
    Bad { what: "a line that is not JSON", log_says: "not a JSON object", volunteer: false, answer: |_, _| line("this is not JSON".into()) },
    Bad {
        what: "an answer without an id",
        log_says: "without a numeric id",
        volunteer: false,
        answer: |_, a| {
            let mut v: Value = serde_json::from_str(a).expect("JSON");
            v.as_object_mut().expect("object").remove("id");
            line(v.to_string())
        },
    },
    Bad {
        what: "a blob that is not base64",
        log_says: "not base64",
        volunteer: false,
        answer: |r, a| {
            let c = first_client(r);
            line(with_sessions(a, |s| {
                s.retain(|x| x["client"] != c.as_str());
                s.push(json!({"client": c, "blob": "%%% not base64 %%%"}));
            }))
        },
    },
    Bad {
        what: "a session over A's max_session_bytes",
        log_says: "over the limit of 262144",
        volunteer: false,
        answer: |r, a| {
            use base64::Engine as _;
            let (c, big) = (first_client(r), base64::engine::general_purpose::STANDARD.encode(vec![7u8; 300 << 10]));
            line(with_sessions(a, |s| {
                s.retain(|x| x["client"] != c.as_str());
                s.push(json!({"client": c, "blob": big}));
            }))
        },
    },
    Bad {
        what: "a session over B's max_session_bytes (but not A's)",
        log_says: "a session is over max_session_bytes (1024)",
        volunteer: true,
        answer: |r, a| {
            use base64::Engine as _;
            let (c, big) = (first_client(r), base64::engine::general_purpose::STANDARD.encode(vec![7u8; 4096]));
            line(with_sessions(a, |s| {
                s.retain(|x| x["client"] != c.as_str());
                s.push(json!({"client": c, "blob": big}));
            }))
        },
    },
];

/// A version 2 export answer with `sessions` and the raw bytes after it.
fn answer_v2(a: &str, sessions: &[(&str, usize)], bytes: usize) -> (String, Vec<u8>) {
    let id = serde_json::from_str::<Value>(a).expect("the demo's answer is JSON")["id"].clone();
    let list: Vec<Value> = sessions.iter().map(|(c, len)| json!({"client": c, "len": len})).collect();
    (json!({"id": id, "ok": true, "bytes": bytes, "sessions": list}).to_string(), vec![b'7'; bytes])
}

/// Spoiled answers of version 2 (raw bytes after the line): the real sessions are dropped,
/// these go instead.
const BAD_V2: &[Bad] = &[
    Bad {
        what: "lengths that do not add up to the bytes that follow",
        log_says: "add up to 3, not the 4",
        volunteer: false,
        answer: |r, a| answer_v2(a, &[(&first_client(r), 3)], 4),
    },
    Bad { what: "a session of a client that was not requested", log_says: "which was not requested", volunteer: false, answer: |_, a| answer_v2(a, &[("198.18.200.1", 2)], 2) },
    Bad {
        what: "a base64 blob, as in version 1",
        log_says: "lacks a client or a len",
        volunteer: false,
        answer: |r, a| {
            let id = serde_json::from_str::<Value>(a).expect("JSON")["id"].clone();
            line(json!({"id": id, "ok": true, "sessions": [{"client": first_client(r), "blob": "e30="}]}).to_string())
        },
    },
    Bad {
        what: "a session over A's max_session_bytes",
        log_says: "307200 bytes, over the limit of 262144",
        volunteer: false,
        answer: |r, a| answer_v2(a, &[(&first_client(r), 300 << 10)], 300 << 10),
    },
    Bad {
        what: "more raw bytes announced than the export may take (the connection closes)",
        log_says: "its outstanding exports may take",
        volunteer: false,
        answer: |_, a| {
            let id = serde_json::from_str::<Value>(a).expect("JSON")["id"].clone();
            line(json!({"id": id, "ok": true, "bytes": 1u64 << 40, "sessions": []}).to_string())
        },
    },
    Bad { what: "a line that is not JSON (the connection closes)", log_says: "not a JSON object", volunteer: false, answer: |_, _| line("this is not JSON".into()) },
    Bad {
        what: "a session over B's max_session_bytes (but not A's)",
        log_says: "a session is over max_session_bytes (1024)",
        volunteer: true,
        answer: |r, a| answer_v2(a, &[(&first_client(r), 4096)], 4096),
    },
];

/// A's real application answers every export in version 1; the proxy spoils each answer in
/// another way. Every one aborts the hand-over at once (no timeout), says why, and the
/// application's frozen sessions are unfrozen: nothing lost, nothing steered.
#[test]
fn invalid_export_answers_abort_at_once_with_a_clear_log_line() {
    spoiled_export_answers(BAD, "1");
}

/// The same in version 2, with what can go wrong in raw bytes; an answer after which the
/// stream cannot be read further closes the connection (the application registers again).
#[test]
fn invalid_version_2_export_answers_abort_at_once_with_a_clear_log_line() {
    spoiled_export_answers(BAD_V2, "2");
}

fn spoiled_export_answers(bad: &'static [Bad], version: &str) {
    if !require_root() {
        return;
    }
    let a = NodeOpts { hook_via: Some("a-proxy.sock".into()), app_args: vec!["--hook-version".into(), version.into()], ..NodeOpts::default() };
    let b = NodeOpts { extra: "max_session_bytes = 1024\n".into(), ..NodeOpts::default() };
    let c = cluster(&[("a", a), ("b", b)], "");
    let proxy = HookProxy::start(
        &c.dir.join("a-proxy.sock"),
        &c.dir.join("a-app.sock"),
        on_answers("export", move |n, req, answer| {
            let (line, raw) = (bad[n % bad.len()].answer)(req, answer);
            Action::Replace(line, raw)
        }),
    );
    wait_registered(&c, "a", 10);
    let t0 = Instant::now();
    let driver = Driver::start(&c, 30);
    for bad in bad {
        let node = if bad.volunteer { "b" } else { "a" };
        let start = Instant::now();
        while !c.log(node).contains(bad.log_says) {
            assert!(start.elapsed() < Duration::from_secs(20), "{}: {node}'s log never said {:?}:\n{}", bad.what, bad.log_says, c.log(node));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let clients = driver.stop();
    c.assert_intact(&clients);
    assert_nothing_steered(&c);
    let log = c.log("a");
    assert!(!log.contains("did not answer"), "every one aborted at once, none by a timeout:\n{log}");
    let exports = proxy.lines(Dir::ToApp, "\"op\":\"export\"").len();
    let aborts = c.app_log("a").matches("hook: abort").count();
    assert!(exports >= bad.len() && aborts >= bad.len(), "each of the {exports} exports was aborted in the application ({aborts} aborts) in {:?}", t0.elapsed());
    assert_eq!(c.app_log("a").matches("hook: commit").count(), 0);
}

#[test]
fn an_export_that_times_out_aborts_the_hand_over() {
    if !require_root() {
        return;
    }
    let a = NodeOpts { hook_via: Some("a-proxy.sock".into()), ..NodeOpts::default() };
    let c = cluster(&[("a", a)], "");
    let proxy = HookProxy::start(&c.dir.join("a-proxy.sock"), &c.dir.join("a-app.sock"), on_answers("export", |_, _, _| Action::Drop));
    wait_registered(&c, "a", 10);
    let driver = Driver::start(&c, 30);
    wait_app_log(&c, "a", "hook: abort", 30);
    assert!(c.log("a").contains("did not answer export"), "A gave up on the export:\n{}", c.log("a"));
    let clients = driver.stop();
    c.assert_intact(&clients);
    assert_nothing_steered(&c);
    drop(proxy);
}

/// A, dual stack, moves IPv4 and IPv6 clients to B in one hand-over and is killed after its
/// IPv4 rules went in, before its IPv6 ones. At start it finds the hand-over in its records,
/// reads the rules for every one of its clients (committed: some are steered), installs the
/// IPv6 rules too, and tells its applications and B the same, whichever asks first: with
/// `volunteer_first`, A's applications reach their agent only once B has asked and settled.
fn killed_between_families(volunteer_first: bool) {
    use redirector_tests::{agents::service6, crowd::Crowd, net::client6};
    let a = NodeOpts { faults: Some("pause-between-families=60000".into()), app_args: patient(), hook_via: Some("a-proxy.sock".into()), ..NodeOpts::default() };
    let b = NodeOpts { app_args: patient(), ..NodeOpts::default() };
    let opts = Options { demo: Some(DemoApp::Rust), dual: true, nodes: [("a".to_string(), a), ("b".to_string(), b)].into_iter().collect(), ..Options::default() };
    let mut c = Cluster::with_options(40, &[("a", 20, 10), ("b", 100, 80)], &opts);
    let forward = || Arc::new(|_: Dir, _: &str| Action::Forward) as Arc<redirector_tests::hook::Filter>;
    let proxy = HookProxy::start(&c.dir.join("a-proxy.sock"), &c.dir.join("a-app.sock"), forward());
    wait_status(&c.sock("a"), 20, "A's two applications to register", |v| v["hook"]["registered"].as_array().is_some_and(|r| r.len() == 2));
    // 15 IPv6 clients (under A's high watermark), then 15 IPv4 ones: whenever A crosses it (at
    // L connections, 21 to 30), it picks L - 10 clients, IPv4 first, of which only L - 15 are
    // IPv4: its first hand-over holds both families. (All at once, A once crossed at 25 with
    // every IPv4 client in and picked only those.)
    let (v4, v6) = (SocketAddr::new(IpAddr::V4(SERVICE4), 80), service6("a"));
    let clients6: Vec<(IpAddr, SocketAddr)> = (1..=15).map(|i| (IpAddr::V6(client6(i)), v6)).collect();
    let crowd6 = Crowd::start(&c.t.client.ns, &clients6, Duration::from_secs(90), 20_000);
    wait_status(&c.sock("a"), 20, "A to serve the 15 IPv6 clients", |v| v["load"].as_u64() >= Some(15));
    let clients4: Vec<(IpAddr, SocketAddr)> = (1..=15).map(|i| (IpAddr::V4(client4(i)), v4)).collect();
    let crowd4 = Crowd::start(&c.t.client.ns, &clients4, Duration::from_secs(90), 20_000);
    wait_log(&c, "a", "TEST FAULT pause-between-families", 30);
    let half = c.rules("a");
    assert!(half.iter().all(|r| r["prefix"].as_str().is_some_and(|p| p.contains('.'))), "only IPv4 rules are in: {half:?}");
    c.kill_agent("a");
    let proxy = if volunteer_first {
        // A's applications cannot reach their agent until B has settled the hand-over.
        drop(proxy);
        c.start_again("a", None);
        wait_status(&c.sock("b"), 30, "B to ask A and settle", |v| v["handoffs"]["awaiting_outcome"] == 0 && v["hook"]["unconfirmed"] == 0);
        HookProxy::start(&c.dir.join("a-proxy.sock"), &c.dir.join("a-app.sock"), forward())
    } else {
        c.start_again("a", None);
        proxy
    };
    let a = wait_status(&c.sock("a"), 30, "A to settle the hand-over", |v| {
        v["handoffs"]["undecided"] == 0
            && v["hook"]["unconfirmed"] == 0
            && v["handoffs"]["clients_in_progress"] == 0
            && v["hook"]["registered"].as_array().is_some_and(|r| r.len() == 2)
    });
    wait_status(&c.sock("b"), 30, "B to settle the hand-over", |v| v["handoffs"]["awaiting_outcome"] == 0 && v["hook"]["unconfirmed"] == 0);
    let moved: Vec<(String, String)> = migrated(&a);
    assert!(moved.iter().any(|(c, _)| c.contains(':')), "the IPv6 clients of the hand-over are steered too: {a}");
    // A, still above its low watermark once the hand-over is settled, may move more clients in
    // a next round at any moment, so the kernel's rules are read between two statuses: every
    // client moved before has its rule, and every rule is of a client moved by then.
    let rules = c.rules("a");
    let after = moved_to(&c.status("a"));
    let ruled: BTreeSet<IpAddr> = rules
        .iter()
        .filter(|r| r["state"] == "active")
        .map(|r| r["prefix"].as_str().and_then(|p| p.split('/').next()).and_then(|ip| ip.parse().ok()).expect("a rule's prefix"))
        .collect();
    let before: BTreeSet<IpAddr> = moved.iter().map(|(c, _)| c.parse().expect("address")).collect();
    assert!(before.is_subset(&ruled), "a rule for every moved client, both families: moved {before:?}, rules {rules:?}");
    assert!(ruled.iter().all(|ip| after.contains_key(ip)), "every rule is of a moved client: rules {rules:?}, moved {after:?}");
    std::thread::sleep(Duration::from_secs(1));
    let steered = moved_to(&c.status("a"));
    let steering = || moved_to(&c.status("a"));
    let mut clients = crowd4.finish_where_steered("A", steering);
    clients.extend(crowd6.finish_where_steered("A", steering));
    c.assert_intact(&clients);
    assert!(
        clients.iter().filter(|cl| cl.src.is_ipv6() && steered.contains_key(&cl.src)).all(|cl| cl.last_server.as_deref() == Some("B")),
        "moved IPv6 clients are served by B with their sessions"
    );
    assert!(!c.app_log("a").contains("hook: abort") && !c.app_log("b").contains("hook: abort"), "nothing aborted");
    drop(proxy);
}

#[test]
fn an_origin_killed_between_its_ipv4_and_ipv6_rules_commits_when_its_application_asks_first() {
    if require_root() {
        killed_between_families(false);
    }
}

#[test]
fn an_origin_killed_between_its_ipv4_and_ipv6_rules_commits_when_the_volunteer_asks_first() {
    if require_root() {
        killed_between_families(true);
    }
}
