//! `cargo xtask bench datapath [--json]`: the classifier's cost per packet next to an empty
//! TC program, and the request rate of a migrated client through A next to the same client
//! talking to B directly. Everything is measured side by side in one run, repeated, medians.
//!
//! Per-packet cost: the kernel's own accounting (`run_time_ns / run_cnt` with BPF statistics
//! enabled) over `BPF_PROG_TEST_RUN` calls of one run each: a steered packet is rewritten, so
//! `repeat` cannot be used for it; every program is measured the same way for fairness.

mod agent_load;
mod cluster;
mod compare;
mod cpu;
mod migrate;
mod negotiation;
mod plot;
mod scale;
mod xdp;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use redirector::datapath::{Datapath, Location, Prefix};
use redirector_common::programs;
use redirector_tests::{
    Server, Topology,
    app::try_connect,
    net::{SERVICE4, SERVICE6, client4, client6, sh},
    packets::{Ip, Pkt},
};

const ROUNDS: usize = 5;
/// Rounds of the request-rate measurement (each side, alternating which goes first): rates
/// through two namespaces' softirqs on two cores vary from round to round.
const RATE_ROUNDS: usize = 9;
/// Length of one request-rate round.
const RATE_ROUND: Duration = Duration::from_secs(1);
const RUNS_PER_ROUND: u32 = 20_000;

/// The `p`-quantile of `v` (nearest rank).
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// An Ethernet + IPv4 + TCP frame from `src:sport`; a SYN carries an MSS option (1460) as
/// every real SYN does, so the steered SYN's cost includes the MSS clamp.
fn frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let p = Pkt::tcp(Ip::V4(src, dst), sport, dport, flags);
    if flags & 0x02 != 0 { p.mss(1460).build() } else { p.build() }
}

fn frame6(src: Ipv6Addr, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let p = Pkt::tcp(Ip::V6(src, dst), 40_000, dport, flags);
    if flags & 0x02 != 0 { p.mss(1440).build() } else { p.build() }
}

struct Cost {
    name: &'static str,
    ns: f64,
}

/// Indexes of the cases in [`classifier_costs`]'s result.
mod case {
    pub const EMPTY: usize = 0;
    pub const NOT_MIGRATED: usize = 2;
    pub const SHARED_SLOT: usize = 3;
    pub const STEERED_SYN: usize = 4;
    pub const STEERED_ACK: usize = 5;
}

fn classifier_costs() -> Vec<Cost> {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        sh(&["ip", "link", "set", "lo", "up"]);
        // As on a real origin: the service has a listener, and a migrated client still has a
        // connection living here.
        sh(&["ip", "addr", "add", &format!("{SERVICE4}/32"), "dev", "lo"]);
        sh(&["ip", "addr", "add", &format!("{}/32", client4(5)), "dev", "lo"]);
        sh(&["ip", "-6", "addr", "add", &format!("{SERVICE6}/128"), "dev", "lo", "nodad"]);
        let listener = TcpListener::bind((SERVICE4, 80)).expect("listener");
        let _listener6 = TcpListener::bind((SERVICE6, 80)).expect("listener v6");
        let local = redirector_tests::app::connect_here(IpAddr::V4(client4(5)), SocketAddr::new(IpAddr::V4(SERVICE4), 80)).expect("a connection living here");
        let local_port = local.local_addr().expect("local addr").port();
        let _accepted = listener.accept().expect("accept");
        let dir = std::env::temp_dir().join(format!("redirector-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bpffs dir");
        sh(&["mount", "-t", "bpf", "bpf", &dir.to_string_lossy()]);
        let result = std::panic::catch_unwind(|| {
            let mut dp = Datapath::open(&Location { bpffs: dir.clone(), instance: "bench".into() }).expect("open");
            let ctl = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
            dp.add_service((IpAddr::V4(SERVICE4), 80), "lo", Some(ctl), Some(1500)).expect("service");
            let ctl6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
            dp.add_service((IpAddr::V6(SERVICE6), 80), "lo", Some(ctl6), Some(1500)).expect("service v6");
            let target = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
            dp.migrate(Prefix { addr: IpAddr::V4(client4(5)), len: 32 }, target, None).expect("rule");
            dp.migrate(Prefix { addr: IpAddr::V6(client6(5)), len: 128 }, IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)), None).expect("rule v6");
            // 1,000 more clients (198.19.10.0 - 198.19.13.249), so the tables are not trivially
            // small, and a /24 whose slots send lookups to the trie (198.19.7.0/24).
            let more: Vec<Prefix> = (0..1000u16)
                .map(|i| {
                    let a = Ipv4Addr::new(198, 19, 10 + u8::try_from(i / 250).unwrap(), u8::try_from(i % 250).unwrap());
                    Prefix { addr: IpAddr::V4(a), len: 32 }
                })
                .collect();
            dp.migrate_many(&more, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3)), None, false).expect("rules");
            dp.migrate(Prefix { addr: IpAddr::V4(Ipv4Addr::new(198, 19, 7, 0)), len: 24 }, target, None).expect("/24 rule");
            let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF run-time statistics");
            let shared = Ipv4Addr::new(198, 18, 7, 9);
            let cases: Vec<(&'static str, &str, Vec<u8>)> = vec![
                ("empty TC program", programs::EMPTY, frame(client4(6), 40_000, SERVICE4, 80, 0x02)),
                ("pass: other port", programs::INGRESS, frame(client4(6), 40_000, SERVICE4, 443, 0x02)),
                ("pass: not migrated", programs::INGRESS, frame(client4(6), 40_000, SERVICE4, 80, 0x02)),
                ("pass: not migrated, shared slot (trie)", programs::INGRESS, frame(shared, 40_000, SERVICE4, 80, 0x02)),
                ("steered: new (SYN, MSS clamped)", programs::INGRESS, frame(client4(5), 40_000, SERVICE4, 80, 0x02)),
                ("steered: existing (ACK, socket lookup)", programs::INGRESS, frame(client4(5), 40_000, SERVICE4, 80, 0x10)),
                ("kept: flow living here (ACK)", programs::INGRESS, frame(client4(5), local_port, SERVICE4, 80, 0x10)),
                ("pass: not migrated, IPv6", programs::INGRESS, frame6(client6(6), SERVICE6, 80, 0x02)),
                ("steered: new (SYN), IPv6", programs::INGRESS, frame6(client6(5), SERVICE6, 80, 0x02)),
                // While another flow moves: a steered client's flows are looked up.
                ("steered: existing, a flow frozen", programs::INGRESS, frame(client4(5), 40_000, SERVICE4, 80, 0x10)),
            ];
            let frozen = [(SocketAddr::new(IpAddr::V4(client4(5)), 40_001), SocketAddr::new(IpAddr::V4(SERVICE4), 80))];
            let freezes = |name: &str| name.ends_with("a flow frozen");
            // Each case must take the path it is named for.
            let expected = [
                None,
                Some("passed"),
                Some("passed-not-migrated"),
                Some("passed-not-migrated"),
                Some("forwarded-new"),
                Some("forwarded-existing"),
                Some("kept-local"),
                Some("passed-not-migrated"),
                Some("forwarded-new"),
                Some("forwarded-existing"),
            ];
            for ((name, prog, pkt), want) in cases.iter().zip(expected) {
                if freezes(name) {
                    dp.freeze(&frozen, Duration::from_secs(600)).expect("freeze");
                }
                let before = dp.stats().expect("stats");
                dp.test_run(prog, pkt, 1).expect("test run");
                let after = dp.stats().expect("stats");
                dp.thaw(&frozen).expect("thaw");
                if let Some(counter) = want {
                    assert_eq!(after.get(counter), before.get(counter) + 1, "case {name:?} must be decided as {counter}");
                }
            }
            let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
            for _ in 0..ROUNDS {
                for (i, (name, prog, pkt)) in cases.iter().enumerate() {
                    if freezes(name) {
                        dp.freeze(&frozen, Duration::from_secs(600)).expect("freeze");
                    }
                    let (t0, n0) = dp.run_stats(prog).expect("stats");
                    for _ in 0..RUNS_PER_ROUND {
                        dp.test_run(prog, pkt, 1).expect("test run");
                    }
                    let (t1, n1) = dp.run_stats(prog).expect("stats");
                    dp.thaw(&frozen).expect("thaw");
                    #[expect(clippy::cast_precision_loss, reason = "ns and counts are small")]
                    samples[i].push((t1 - t0) as f64 / (n1 - n0) as f64);
                }
            }
            cases.iter().zip(samples).map(|((name, _, _), s)| Cost { name, ns: median(s) }).collect::<Vec<_>>()
        });
        let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&dir);
        match result {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
    .join()
    .expect("classifier benchmark")
}

/// Requests per second over fresh connections (connect, one request, close), for `dur`.
fn rate(ns: &str, src: IpAddr, dst: SocketAddr, dur: Duration, max: u32) -> f64 {
    let start = Instant::now();
    let mut n = 0u32;
    let (mut tc, mut tw, mut tclose) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    while start.elapsed() < dur && n < max {
        let t0 = Instant::now();
        let mut c = try_connect(ns, src, dst).expect("connect");
        let t1 = Instant::now();
        c.try_who().expect("request");
        let t2 = Instant::now();
        drop(c);
        tclose += t2.elapsed();
        tc += t1 - t0;
        tw += t2 - t1;
        n += 1;
    }
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!("{dst}: connect {:?} who {:?} close {:?} per request", tc / n, tw / n, tclose / n);
    }
    f64::from(n) / start.elapsed().as_secs_f64()
}

/// Requests per second over one keep-alive connection, for `dur`.
fn keepalive_rate(ns: &str, src: IpAddr, dst: SocketAddr, dur: Duration, max: u32) -> f64 {
    let mut c = try_connect(ns, src, dst).expect("connect");
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < dur && n < max {
        c.try_who().expect("request");
        n += 1;
    }
    f64::from(n) / start.elapsed().as_secs_f64()
}

struct Rates {
    direct: f64,
    through_a: f64,
    direct_ka: f64,
    through_a_ka: f64,
}

fn request_rates() -> Rates {
    // One migrated client address per round: the client closes first, so every connection
    // leaves a TIME_WAIT behind on its side, and one address would run out of ports (and
    // measure that) after ~28,000 connections to one destination.
    let t = Topology::new(u16::try_from(RATE_ROUNDS).expect("rounds"));
    let b_addr = SocketAddr::new(IpAddr::V4(t.b.v4[0]), 80);
    let svc = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let _a = Server::start(&t.a.ns, "A", svc);
    let _b = Server::start(&t.b.ns, "B", b_addr);
    t.steer_a_to_b_v4(80, 80);
    let clients: Vec<IpAddr> = (1..=RATE_ROUNDS).map(|i| IpAddr::V4(client4(u16::try_from(i).expect("client")))).collect();
    for client in &clients {
        t.redirector_ok(&t.a, &["rule", "add", &client.to_string(), "--to", &t.b.v4[0].to_string()]);
        let mut c = try_connect(&t.client.ns, *client, svc).expect("connect");
        assert_eq!(c.try_who().expect("who").0, "B", "the benchmark's clients must be steered to B");
    }
    let dur = RATE_ROUND;
    let (mut d, mut a, mut dk, mut ak) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (round, client) in clients.iter().copied().enumerate() {
        // Alternate which goes first, so drift in the machine does not favour one side.
        if round % 2 == 0 {
            d.push(rate(&t.client.ns, client, b_addr, dur, 50_000));
            a.push(rate(&t.client.ns, client, svc, dur, 50_000));
            dk.push(keepalive_rate(&t.client.ns, client, b_addr, dur, 200_000));
            ak.push(keepalive_rate(&t.client.ns, client, svc, dur, 200_000));
        } else {
            a.push(rate(&t.client.ns, client, svc, dur, 50_000));
            d.push(rate(&t.client.ns, client, b_addr, dur, 50_000));
            ak.push(keepalive_rate(&t.client.ns, client, svc, dur, 200_000));
            dk.push(keepalive_rate(&t.client.ns, client, b_addr, dur, 200_000));
        }
    }
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!("A: {}", t.redirector_ok(&t.a, &["stats", "--json"]));
        eprintln!("B: {}", t.redirector_ok(&t.b, &["stats", "--json"]));
        eprintln!("client: {}", t.client.exec(&["nstat", "-az", "TcpExtTCPSynRetrans", "TcpRetransSegs", "TcpExtTCPTimeouts"]));
        eprintln!("B: {}", t.b.exec(&["nstat", "-az", "TcpExtListenDrops", "TcpExtListenOverflows", "TcpRetransSegs"]));
    }
    Rates { direct: median(d), through_a: median(a), direct_ka: median(dk), through_a_ka: median(ak) }
}

/// Gossip mode: waits until A holds its `n` members live with their room known, and its
/// `standby` members linked (as an agent that has run a while has them).
fn wait_rooms_known(c: &redirector_tests::agents::Cluster, n: usize, standby: usize) {
    redirector_tests::agents::wait_status(&c.sock("a"), 30, "A to know every member's room and link its standby members", |v| {
        let linked = v["siblings"].as_array().map_or(0, |s| s.iter().filter(|x| x["up"] == true).count());
        v["cluster"]["members"].as_array().is_some_and(|m| m.len() == n && m.iter().all(|x| x["room"].is_number()))
            && v["cluster"]["standby"].as_array().map_or(0, Vec::len) == standby
            && linked >= standby
    });
}

/// One shedding: 30 clients drive A over its high watermark (20); from the threshold crossing
/// (the kernel's time of the 21st connection, reported on the load event ring buffer) to the
/// round's rules installed, on the same clock (`CLOCK_MONOTONIC`).
/// Round `round` has clients of its own: a client whose rule was removed less than
/// `slots::STALE_SECS` (30 s) ago and is steered to another target costs the rules an RCU
/// grace period (about 10 ms), which every round after the first paid in gossip mode (another
/// volunteer each time) and none in static mode (the same one).
/// `gossip`: the cluster is in gossip mode with `standby` members kept linked (A asks 3
/// members drawn among those with room, the linked ones first, opening links to the others;
/// its restart closes them all, and it links its standby members again before the round).
fn negotiate_once(c: &mut redirector_tests::agents::Cluster, round: u16, gossip: Option<usize>) -> f64 {
    let svc = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let conns: Vec<_> = (round * 30 + 1..=round * 30 + 30).map(|i| try_connect(&c.t.client.ns, IpAddr::V4(client4(i)), svc).expect("connect")).collect();
    let v = redirector_tests::agents::wait_status(&c.sock("a"), 20, "A to shed", |v| v["last_shed_ms"].is_number());
    let ms = v["last_shed_ms"].as_f64().expect("ms");
    if std::env::var_os("BENCH_DEBUG").is_some() {
        for l in c.log("a").lines().filter(|l| l.contains("shedding done") || l.contains("hand-over committed")).collect::<Vec<_>>().iter().rev().take(3) {
            eprintln!("    {l}");
        }
    }
    drop(conns);
    // Reset: release the rules and restart A's agent with a clean slate.
    let rules = c.t.redirector_ok(&c.t.a, &["rule", "list", "--json"]);
    let rules: serde_json::Value = serde_json::from_str(&rules).expect("rules JSON");
    for r in rules["rules"].as_array().into_iter().flatten() {
        c.t.redirector_ok(&c.t.a, &["rule", "del", r["prefix"].as_str().expect("prefix"), "--now"]);
    }
    c.restart("a");
    let n = c.t.extra.len();
    if let Some(standby) = gossip {
        wait_rooms_known(c, n, standby);
    } else {
        redirector_tests::agents::wait_status(&c.sock("a"), 20, "A's siblings up", |v| v["siblings"].as_array().is_some_and(|s| s.iter().filter(|x| x["up"] == true).count() == n));
    }
    ms
}

fn negotiate(json: bool) {
    let mut medians = Vec::new();
    // Static siblings (every one linked, every one asked), then gossip with 16 members (3
    // asked): with 3 members kept linked in advance (the default), and with none (every link
    // opened inside the negotiation), side by side in one run.
    for (n, gossip) in [(1usize, None), (3, None), (16, None), (16, Some(3)), (16, Some(0))] {
        let mode = match gossip {
            None => "static",
            Some(0) => "gossip-0",
            Some(_) => "gossip",
        };
        eprintln!("negotiation with {n} sibling(s), {mode}: starting {} agents...", n + 1);
        let names: Vec<String> = (1..=n).map(|i| format!("s{i}")).collect();
        let mut nodes: Vec<(&str, u64, u64)> = vec![("a", 20, 10)];
        nodes.extend(names.iter().map(|s| (s.as_str(), 1000, 900)));
        let a = redirector_tests::agents::NodeOpts { cluster: format!("standby = {}\n", gossip.unwrap_or(0)), ..redirector_tests::agents::NodeOpts::default() };
        let opts =
            redirector_tests::agents::Options { gossip: gossip.is_some(), nodes: [("a".to_string(), a)].into_iter().collect(), ..redirector_tests::agents::Options::default() };
        let mut c = redirector_tests::agents::Cluster::with_options(u16::try_from(ROUNDS * 30).expect("few"), &nodes, &opts);
        if let Some(standby) = gossip {
            // The first round must not wait for it either.
            wait_rooms_known(&c, n, standby);
        }
        let runs: Vec<f64> = (0..ROUNDS).map(|r| negotiate_once(&mut c, u16::try_from(r).expect("few"), gossip)).collect();
        eprintln!("  runs (ms): {runs:.1?}");
        // The first run is cold: the volunteers adopt the service then (route, sysctls); later
        // runs find it adopted, as repeated shedding in production does.
        medians.push((n, mode, median(runs.clone()), runs[0], runs.iter().copied().fold(0.0, f64::max)));
    }
    println!("Negotiation, threshold crossing (kernel time of the crossing connection) to rules installed:");
    println!("  {:<10} {:<8} {:>12} {:>14}", "siblings", "mode", "median ms", "first (cold)");
    for (n, mode, ms, cold, _) in &medians {
        println!("  {n:<10} {mode:<8} {ms:>12.1} {cold:>14.1}");
    }
    let (ms16, gossip16, gossip_max, unlinked16) = (medians[2].2, medians[3].2, medians[3].4, medians[4].2);
    println!("Gossip (3 asked, 3 linked in advance) vs static (16 asked, linked), 16 siblings: {:.2}x", gossip16 / ms16);
    println!("Gossip with no member linked in advance (links opened each round) vs with 3: {:.2}x", unlinked16 / gossip16);
    println!("Goal: under 20 ms with 16 siblings (static): {ms16:.1} ms {}", if ms16 < 20.0 { "met" } else { "MISSED" });
    println!("Gossip, 16 members: slowest round {gossip_max:.1} ms (the goal, p99 under 50 ms, is for 1,000 members: not measured here)");
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ms_1": medians[0].2, "ms_3": medians[1].2, "ms_16": ms16, "gossip_ms_16": gossip16, "gossip_max_ms_16": gossip_max,
                "gossip_vs_static_16": gossip16 / ms16,
                "gossip_unlinked_ms_16": unlinked16, "unlinked_vs_standby_16": unlinked16 / gossip16,
                "cold_ms_1": medians[0].3, "cold_ms_3": medians[1].3, "cold_ms_16": medians[2].3, "cold_gossip_ms_16": medians[3].3,
            })
        );
    }
}

/// Synthetic sessions for the hand-over benchmark: every client has a blob of `size` bytes.
struct Synthetic {
    size: usize,
    imported: std::sync::atomic::AtomicUsize,
}

impl redirector_sdk::Sessions for Synthetic {
    fn export(&self, _: &str, clients: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
        clients.iter().map(|c| (*c, vec![0x5a; self.size])).collect()
    }
    fn import(&self, _: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
        self.imported.fetch_add(sessions.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn commit(&self, _: &str) {}
    fn abort(&self, _: &str) {}
}

fn handoff(json: bool) {
    use std::sync::Arc;
    // 10,000 x 64 KiB is 640 MiB in one hand-over: one run.
    let cases: [(usize, usize, usize); 6] = [(100, 1 << 10, 5), (1_000, 1 << 10, 5), (10_000, 1 << 10, 5), (100, 64 << 10, 3), (1_000, 64 << 10, 3), (10_000, 64 << 10, 1)];
    eprintln!("hand-over: starting agents A and B (default timeouts: they grow with the data)...");
    let c = redirector_tests::agents::Cluster::with_config(2, &[("a", 1_000_000, 900_000), ("b", 1_000_000, 900_000)], "");
    let mut results = Vec::new();
    let (mut printed, mut printed_b) = (0, 0);
    // HANDOFF_CASE=NxKIB runs that one case once (for investigating).
    let only: Option<(usize, usize)> = std::env::var("HANDOFF_CASE").ok().and_then(|v| {
        let (n, k) = v.split_once('x')?;
        Some((n.parse().ok()?, k.parse::<usize>().ok()? << 10))
    });
    let cases: Vec<(usize, usize, usize)> = match only {
        Some((n, size)) => vec![(n, size, 1)],
        None => cases.to_vec(),
    };
    // Each case in both hook protocol versions, side by side: version 1 (base64 in JSON) is
    // the baseline of version 2 (raw bytes after the line).
    // HANDOFF_VERSION=1 or 2 runs that version only (for investigating).
    let versions: Vec<redirector_sdk::Version> = match std::env::var("HANDOFF_VERSION").as_deref() {
        Ok("1") => vec![redirector_sdk::Version::V1],
        Ok("2") => vec![redirector_sdk::Version::V2],
        _ => vec![redirector_sdk::Version::V1, redirector_sdk::Version::V2],
    };
    for ((n, size, runs), version) in cases.iter().copied().flat_map(|c| versions.iter().map(move |v| (c, *v))) {
        let a_app = Arc::new(Synthetic { size, imported: 0.into() });
        let b_app = Arc::new(Synthetic { size, imported: 0.into() });
        let hook = |node: &str, service: Ipv4Addr, app: &Arc<Synthetic>| {
            let app: Arc<dyn redirector_sdk::Sessions> = app.clone();
            redirector_sdk::Hook::start_version(c.dir.join(format!("{node}-app.sock")), SocketAddr::new(IpAddr::V4(service), 80), Some(version), app)
        };
        let (ha, hb) = (hook("a", SERVICE4, &a_app), hook("b", redirector_tests::net::SERVICE4_B, &b_app));
        std::thread::sleep(Duration::from_millis(800));
        let (mut ms, mut back) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            // Client addresses from 198.19.0.1 up (inside 198.18.0.0/15; no packet is sent to
            // them). Runs reuse them, so the rule map stays within its size: each run moves them
            // out, then gives them back.
            let clients: Vec<IpAddr> = (1..=n).map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + u32::try_from(i).expect("small")))).collect();
            let before = (b_app.imported.load(std::sync::atomic::Ordering::Relaxed), a_app.imported.load(std::sync::atomic::Ordering::Relaxed));
            let v = redirector::admin::move_clients(&c.sock("a"), clients.clone(), Duration::from_secs(300)).expect("move request");
            assert_eq!(v.moved, n, "all {n} clients moved: {v:?}");
            assert_eq!(b_app.imported.load(std::sync::atomic::Ordering::Relaxed) - before.0, n, "B's application imported every session");
            ms.push(v.ms);
            // A client is not moved again at once (its waiting requests are answered first).
            std::thread::sleep(redirector::agent::MOVE_DWELL + Duration::from_millis(200));
            // Back home: B exports, A imports, A withdraws its rules, both commit.
            let v = redirector::admin::give_back(&c.sock("a"), clients.clone(), Duration::from_secs(300)).expect("give-back request");
            assert_eq!(v.given_back, n, "all {n} clients came back: {v:?}");
            assert_eq!(a_app.imported.load(std::sync::atomic::Ordering::Relaxed) - before.1, n, "A's application imported every session");
            back.push(v.ms);
            std::thread::sleep(redirector::agent::MOVE_DWELL + Duration::from_millis(200));
        }
        drop((ha, hb));
        eprintln!("  {n} x {} KiB, hook version {}: out {ms:.1?} ms, back {back:.1?} ms", size >> 10, version.number());
        // Where the time went, from the origin agent's own log line per hand-over.
        let log = c.log("a");
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("hand-over committed") || l.contains("hand-back committed")).collect();
        for l in &lines[printed.min(lines.len())..] {
            let phases: Vec<&str> = l.split_whitespace().filter(|w| w.contains("_ms=")).collect();
            eprintln!("    {} {}", if l.contains("hand-back") { "back:" } else { "out: " }, phases.join(" "));
        }
        printed = lines.len();
        // And the volunteer's part of each hand-over out: checking what arrived, importing it.
        let log = c.log("b");
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("sessions imported into the application")).collect();
        for l in &lines[printed_b.min(lines.len())..] {
            let phases: Vec<&str> = l.split_whitespace().filter(|w| w.contains("_ms=")).collect();
            eprintln!("    B:   {}", phases.join(" "));
        }
        printed_b = lines.len();
        results.push((version.number(), n, size, median(ms), median(back)));
    }
    println!("Hand-over out (export -> transfer -> import -> rules installed -> commit) and back (export -> import -> rules withdrawn -> commit), agent's clock, median;");
    println!("hook protocol version 2 (raw blobs) against version 1 (base64 in JSON) in the same run:");
    println!("  {:<10} {:>8} {:>4} {:>10} {:>10} {:>9} {:>10} {:>10}", "sessions", "size", "hook", "out ms", "back ms", "back/out", "out v2/v1", "back v2/v1");
    let find = |v: u64, n: usize, size: usize| results.iter().find(|r| (r.0, r.1, r.2) == (v, n, size)).map(|r| (r.3, r.4));
    for (v, n, size, ms, back) in &results {
        let vs = if *v == 2 { find(1, *n, *size).map(|(o, b)| (format!("{:.2}x", ms / o), format!("{:.2}x", back / b))) } else { None };
        let (vo, vb) = vs.unwrap_or_default();
        println!("  {n:<10} {:>6}KiB {v:>4} {ms:>10.1} {back:>10.1} {:>8.2}x {vo:>10} {vb:>10}", size >> 10, back / ms);
    }
    for (n, size, goal) in [(10_000, 1 << 10, 100.0), (10_000, 64 << 10, 1500.0)] {
        if let Some((out, back)) = find(2, n, size) {
            let met = |ms: f64| if ms < goal { "met" } else { "MISSED" };
            println!("Goal: {n} x {} KiB under {goal} ms each way (version 2): out {out:.1} ms {}, back {back:.1} ms {}", size >> 10, met(out), met(back));
        }
    }
    if json {
        let mut m = serde_json::Map::new();
        for (v, n, size, ms, back) in &results {
            m.insert(format!("v{v}_ms_{n}x{}k", size >> 10), serde_json::json!(ms));
            m.insert(format!("v{v}_back_ms_{n}x{}k", size >> 10), serde_json::json!(back));
        }
        println!("{}", serde_json::Value::Object(m));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("error: the benchmark needs root");
        std::process::exit(1);
    }
    match args.first().map(String::as_str) {
        Some("datapath") => {}
        Some("negotiate") => return negotiate(json),
        Some("handoff") => return handoff(json),
        Some("migrate") => return migrate::migrate(json),
        Some("compare") => return compare::compare(json),
        Some("scale") => return scale::scale(json),
        Some("xdp") => return xdp::xdp(json),
        Some("cluster") => return cluster::cluster(json, &args),
        _ => {
            eprintln!("usage: redirector-bench datapath|negotiate|handoff|migrate|scale|xdp|compare|cluster [--members|--agents] [--json]");
            std::process::exit(2);
        }
    }
    eprintln!("measuring the classifier ({ROUNDS} rounds x {RUNS_PER_ROUND} runs per case)...");
    let costs = classifier_costs();
    eprintln!("measuring request rates through A and direct to B ({RATE_ROUNDS} rounds)...");
    let r = request_rates();
    let empty = costs[case::EMPTY].ns;
    println!("Classifier cost per packet (kernel run_time_ns/run_cnt, median of {ROUNDS} rounds):");
    println!("  {:<36} {:>8} {:>10}", "case", "ns/pkt", "vs empty");
    for c in &costs {
        println!("  {:<36} {:>8.1} {:>9.2}x", c.name, c.ns, c.ns / empty);
    }
    println!("Request rate of a migrated client (median of {RATE_ROUNDS} rounds of {} s each, alternating order):", RATE_ROUND.as_secs_f64());
    println!("  {:<34} {:>10} {:>12} {:>8}", "", "direct B", "through A", "ratio");
    println!("  {:<34} {:>10.0} {:>12.0} {:>7.2}x", "new connection per request (req/s)", r.direct, r.through_a, r.through_a / r.direct);
    println!("  {:<34} {:>10.0} {:>12.0} {:>7.2}x", "keep-alive requests (req/s)", r.direct_ka, r.through_a_ka, r.through_a_ka / r.direct_ka);
    // The headlines: a client with no rule (the common packet), and the costlier of the two
    // steered paths.
    let pass = costs[case::NOT_MIGRATED].ns / empty;
    let pass_shared = costs[case::SHARED_SLOT].ns / empty;
    let steered_new = costs[case::STEERED_SYN].ns / empty;
    let steered_existing = costs[case::STEERED_ACK].ns / empty;
    let steered = steered_new.max(steered_existing);
    let through = r.through_a / r.direct;
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "Goals: pass <= 1.5x empty: {pass:.2}x {} (slot shared with a migrated client: {pass_shared:.2}x); steered <= 3x empty: new {steered_new:.2}x {}, existing {steered_existing:.2}x {}; through A >= 0.9x direct: {through:.2}x {}",
        verdict(pass <= 1.5),
        verdict(steered_new <= 3.0),
        verdict(steered_existing <= 3.0),
        verdict(through >= 0.9),
    );
    if json {
        println!(
            "{}",
            serde_json::json!({
                "empty_ns": empty,
                "cases_ns": costs.iter().map(|c| (c.name.to_string(), serde_json::json!(c.ns))).collect::<serde_json::Map<_, _>>(),
                "pass_vs_empty": pass,
                "pass_shared_slot_vs_empty": pass_shared,
                "steered_vs_empty": steered,
                "steered_new_vs_empty": steered_new,
                "steered_existing_vs_empty": steered_existing,
                "direct_rps": r.direct,
                "through_a_rps": r.through_a,
                "through_a_vs_direct": through,
                "direct_keepalive_rps": r.direct_ka,
                "through_a_keepalive_rps": r.through_a_ka,
                "through_a_vs_direct_keepalive": r.through_a_ka / r.direct_ka,
            })
        );
    }
}
