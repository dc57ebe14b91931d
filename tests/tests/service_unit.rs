//! `contrib/redirector.service` kept true: its `ExecStart`, as written (the binary and the
//! configuration's path aside), run as root with only the unit's `CapabilityBoundingSet` (by
//! `setpriv`, as systemd would), makes agents that shed load and hand clients over, and that
//! stop within the unit's `TimeoutStopSec` with every client home.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use redirector_tests::{
    agents::{Cluster, Launch, NodeOpts, Options, migrated, moved_to, open, served_by, wait_status},
    net::{SERVICE4, client4},
    require_root,
};

const UNIT: &str = include_str!("../../contrib/redirector.service");

/// The unit's value of `key` (its last line, as systemd takes it).
fn key(key: &str) -> String {
    UNIT.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).next_back().unwrap_or_else(|| panic!("the unit has no {key}=")).trim().to_string()
}

/// The agent's launch as the unit says.
fn launch() -> Launch {
    let exec: Vec<String> = key("ExecStart").split_whitespace().map(str::to_string).collect();
    assert_eq!(exec[0], "/usr/local/bin/redirector", "the path the unit's install comment uses");
    let config = exec.iter().position(|a| a == "--config").expect("ExecStart names the configuration") + 1;
    let args = exec[1..].iter().enumerate().map(|(i, a)| if i + 1 == config { "{config}".to_string() } else { a.clone() }).collect();
    assert_eq!(key("User"), "root");
    Launch { args, capabilities: key("CapabilityBoundingSet").split_whitespace().map(str::to_string).collect() }
}

/// Capability numbers (linux/capability.h) of the names the unit may use.
fn cap_number(name: &str) -> u32 {
    match name {
        "CAP_CHOWN" => 0,
        "CAP_NET_ADMIN" => 12,
        "CAP_NET_RAW" => 13,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("add {other} to this test's table"),
    }
}

/// The effective capabilities of process `pid`, from the kernel.
fn effective(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's status");
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).expect("CapEff").trim();
    u64::from_str_radix(hex, 16).expect("hex")
}

#[test]
fn the_units_exec_start_with_only_its_capabilities_sheds_load_and_stops_in_time() {
    if !require_root() {
        return;
    }
    let launch = launch();
    assert!(!launch.capabilities.iter().any(|c| c == "CAP_SYS_ADMIN"), "the unit does without CAP_SYS_ADMIN: {:?}", launch.capabilities);
    let node = || NodeOpts { launch: Some(launch.clone()), ..NodeOpts::default() };
    let opts = Options { nodes: [("a".to_string(), node()), ("b".to_string(), node())].into_iter().collect(), ..Options::default() };
    let mut c = Cluster::with_options(45, &[("a", 30, 20), ("b", 100, 80)], &opts);
    let want = launch.capabilities.iter().fold(0u64, |m, n| m | 1 << cap_number(n));
    for n in ["a", "b"] {
        assert_eq!(effective(c.agents[n].child.id()), want, "{n}'s agent runs with exactly the unit's capabilities");
    }
    // 45 clients drive A over its high watermark (30): it moves clients to B, which adopts
    // A's service and delivers them to its own application.
    let svc = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let conns = open(&c, 1..=45, svc);
    let a = wait_status(&c.sock("a"), 30, "A to move clients under its low watermark", |v| migrated(v).len() >= 25);
    let moved = moved_to(&a);
    assert!(moved.values().all(|to| to == "b"));
    drop(conns);
    std::thread::sleep(Duration::from_millis(300));
    let conns = open(&c, 1..=45, svc);
    for (i, _, who) in &conns {
        let expected = if moved.contains_key(&IpAddr::V4(client4(*i))) { "B" } else { "A" };
        assert_eq!(who, expected, "client {} is served by {expected}", client4(*i));
    }
    assert_eq!(served_by(&conns).get("B").copied().unwrap_or(0), moved.len());
    drop(conns);
    // Stopped as systemd stops it: SIGTERM, then at most TimeoutStopSec.
    assert_eq!(key("KillSignal"), "SIGTERM");
    let stop: u64 = key("TimeoutStopSec").parse().expect("seconds");
    let took = c.term_agent("a", stop);
    let active = c.rules("a").into_iter().filter(|r| r["state"] == "active").count();
    assert_eq!(active, 0, "every client is home after A stopped (in {took:?}): {:?}", c.rules("a"));
}
