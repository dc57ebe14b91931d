//! The agent's own cost at scale (part of `cargo xtask bench scale`): an origin with 16
//! siblings heartbeating, before and after 100,000 of its clients moved out (with sessions, to
//! one sibling): its CPU (user and system time of the process, per second of steady state)
//! and its resident memory, side by side.
//!
//! The moved clients are rules only (198.18.64.0 and up, inside 198.18.0.0/15 and clear of
//! the topology's hosts): no packet is sent to them.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use redirector_tests::agents::{Cluster, wait_status};

/// Siblings of the origin.
pub const SIBLINGS: usize = 16;
/// Clients moved out.
pub const CLIENTS: u32 = 100_000;
/// Length of each steady-state measurement.
const STEADY: Duration = Duration::from_secs(10);

/// What the origin's agent cost, before and after the move.
pub struct AgentLoad {
    pub cpu_ms_per_s: [f64; 2],
    pub rss_kib: [u64; 2],
    pub move_ms: f64,
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's status");
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).expect("VmRSS")
}

/// CPU ms per second over [`STEADY`].
fn steady_cpu(pid: u32) -> f64 {
    let (c0, t0) = (crate::cpu::process_ms(pid), Instant::now());
    std::thread::sleep(STEADY);
    (crate::cpu::process_ms(pid) - c0) / t0.elapsed().as_secs_f64()
}

pub fn measure() -> AgentLoad {
    let names: Vec<String> = (1..=SIBLINGS).map(|i| format!("s{i}")).collect();
    let mut nodes: Vec<(&str, u64, u64)> = vec![("a", 1_000_000, 900_000)];
    nodes.extend(names.iter().map(|s| (s.as_str(), 1_000_000, 900_000)));
    eprintln!("agent at scale: starting A and {SIBLINGS} siblings...");
    let c = Cluster::with_config(2, &nodes, "");
    wait_status(&c.sock("a"), 30, "A's siblings up", |v| v["siblings"].as_array().is_some_and(|s| s.iter().filter(|x| x["up"] == true).count() == SIBLINGS));
    let pid = c.agents["a"].child.id();
    // The applications: A's sessions go to s1's.
    let a_app = Arc::new(crate::Synthetic { size: 64, imported: 0.into() });
    let s1_app = Arc::new(crate::Synthetic { size: 64, imported: 0.into() });
    let hook = |node: &str, service: Ipv4Addr, app: &Arc<crate::Synthetic>| {
        let app: Arc<dyn redirector_sdk::Sessions> = app.clone();
        redirector_sdk::Hook::start_version(c.dir.join(format!("{node}-app.sock")), SocketAddr::new(IpAddr::V4(service), 80), Some(redirector_sdk::Version::V2), app)
    };
    let _hooks = (hook("a", redirector_tests::net::SERVICE4, &a_app), hook("s1", c.t.extra[0].v4[1], &s1_app));
    std::thread::sleep(Duration::from_secs(1));
    let before = (steady_cpu(pid), rss_kib(pid));
    let first = u32::from(Ipv4Addr::new(198, 18, 64, 0));
    let clients: Vec<IpAddr> = (0..CLIENTS).map(|i| IpAddr::V4(Ipv4Addr::from(first + i))).collect();
    let moved = redirector::admin::move_clients_to(&c.sock("a"), clients, Some("s1"), Duration::from_secs(300)).expect("move request");
    assert_eq!(moved.moved, CLIENTS as usize, "every client moved: {moved:?}");
    assert_eq!(s1_app.imported.load(std::sync::atomic::Ordering::Relaxed), CLIENTS as usize, "s1's application imported every session");
    // Past the dwell and the first rounds of housekeeping over the new rules.
    std::thread::sleep(redirector::agent::MOVE_DWELL + Duration::from_secs(2));
    let after = (steady_cpu(pid), rss_kib(pid));
    AgentLoad { cpu_ms_per_s: [before.0, after.0], rss_kib: [before.1, after.1], move_ms: moved.ms }
}

pub fn print(l: &AgentLoad) {
    println!("The origin's agent with {SIBLINGS} siblings heartbeating, before and after {CLIENTS} clients moved out ({:.0} ms to move them):", l.move_ms);
    println!("  {:<34} {:>10} {:>10} {:>8}", "", "before", "after", "ratio");
    println!("  {:<34} {:>10.1} {:>10.1} {:>7.2}x", "CPU, ms per second (user + system)", l.cpu_ms_per_s[0], l.cpu_ms_per_s[1], l.cpu_ms_per_s[1] / l.cpu_ms_per_s[0]);
    #[expect(clippy::cast_precision_loss, reason = "sizes are small")]
    let ratio = l.rss_kib[1] as f64 / l.rss_kib[0] as f64;
    println!("  {:<34} {:>10} {:>10} {:>7.2}x", "resident memory, KiB", l.rss_kib[0], l.rss_kib[1], ratio);
}
