//! `cargo xtask bench cluster [--json]`: the membership of clusters of 10, 100 and 1,000
//! members, each a real gossip member (`redirector::cluster`: foca's SWIM, authenticated UDP,
//! load records) as a task in this process, over loopback. Measured in one run, per size:
//! how long joining through one seed takes, the traffic per member at rest, how long a change
//! of a member's room takes to reach every member, how long three members killed at once take
//! to be known dead by all, and every member declared dead that was not killed (a false
//! death).
//!
//! Then the same sizes of real agents negotiating over this membership (`negotiation.rs`).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rand::{RngExt as _, seq::SliceRandom as _};
use redirector::cluster::{Event, Gossip, Member, Settings, seal::Key};
use tokio::{net::UdpSocket, sync::mpsc};

use crate::{cpu, negotiation, percentile};

const SIZES: [usize; 3] = [10, 100, 1000];
/// The members' high watermark; every member starts with a load well under it.
const HIGH: u64 = 100;
/// Members killed at once.
const KILLED: usize = 3;
/// How long traffic at rest is counted.
const REST: Duration = Duration::from_secs(10);

/// What one cluster size gave.
struct Run {
    n: usize,
    join_s: f64,
    msgs_per_s: f64,
    bytes_per_s: f64,
    /// This process's CPU time at rest, per member and second of rest.
    cpu_us_per_s: f64,
    spread_p50_ms: f64,
    spread_p99_ms: f64,
    detect_first_s: f64,
    detect_all_s: f64,
    false_deaths: u64,
    rejoins: u64,
    refused: u64,
    seconds: f64,
}

/// Deaths heard, by whom, when.
#[derive(Default)]
struct Heard {
    deaths: Mutex<Vec<(usize, SocketAddr, Instant)>>,
    rejoins: AtomicU64,
}

async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.elapsed()
}

fn sent(members: &[Gossip]) -> (u64, u64) {
    members.iter().fold((0, 0), |(m, b), g| (m + g.traffic().sent.load(Ordering::Relaxed), b + g.traffic().sent_bytes.load(Ordering::Relaxed)))
}

#[expect(clippy::cast_precision_loss, reason = "counts of messages as rates")]
async fn run(n: usize) -> Run {
    let began = Instant::now();
    let key: [u8; 32] = rand::rng().random();
    let heard = Arc::new(Heard::default());
    let mut members: Vec<Gossip> = Vec::with_capacity(n);
    let mut rng = rand::rng();
    for i in 0..n {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("a loopback UDP socket");
        let gossip = socket.local_addr().expect("its address");
        let me = Member { name: format!("node-{i}"), gossip, control: SocketAddr::new(gossip.ip(), 1), dual_stack: None, services: Vec::new(), boot: 1 };
        // Each joins through one member already started, any one.
        let seeds = if i == 0 { vec![] } else { vec![members[rng.random_range(0..i)].me().gossip] };
        let size = u32::try_from(n).expect("a small cluster");
        let (g, events) = Gossip::start(socket, Settings { me, key: Key::new(&key), seeds, size });
        tokio::spawn(listen(i, events, heard.clone()));
        members.push(g);
    }
    let join = until("every member sees every other", Duration::from_secs(180), || members.iter().all(|g| g.live().len() == n - 1)).await;

    for g in &members {
        let _ = g.set_load(rng.random_range(30..70), HIGH);
    }
    // Every member passes each of the n records on 5 + 2 ln(n) times, a few dozen to a
    // datagram: about 50 s at 1,000 members here (60 s was once too short).
    let rooms = until("every member knows every other's room", Duration::from_secs(180), || members.iter().all(|g| g.candidates().len() == n - 1)).await;
    eprintln!("  {n} members: every room known by all {:.1} s after all published", rooms.as_secs_f64());
    // At rest: no member has an update left to pass on.
    until("every member passed every update on", Duration::from_secs(120), || members.iter().all(|g| g.traffic().backlog.load(Ordering::Relaxed) == 0)).await;

    let ((m0, b0), c0) = (sent(&members), cpu::own_seconds());
    tokio::time::sleep(REST).await;
    let ((m1, b1), c1) = (sent(&members), cpu::own_seconds());
    let per = REST.as_secs_f64() * n as f64;

    // A tenth of the members pass their watermark: how long until each other member sees it.
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let overloaded: Vec<usize> = order[..(n / 10).max(1)].to_vec();
    let changed = Instant::now();
    for &i in &overloaded {
        let _ = members[i].set_load(HIGH + 30, HIGH);
    }
    let mut seen_at: Vec<Option<Duration>> = vec![None; n * overloaded.len()];
    let watched: Vec<SocketAddr> = overloaded.iter().map(|&i| members[i].me().gossip).collect();
    until("every member sees the overloaded members full", Duration::from_secs(30), || {
        let now = changed.elapsed();
        let mut all = true;
        for (j, g) in members.iter().enumerate() {
            let c = g.candidates();
            for (k, w) in watched.iter().enumerate() {
                if overloaded[k] == j || seen_at[j * watched.len() + k].is_some() {
                    continue;
                }
                if c.iter().any(|(a, room)| a == w && *room == 0) {
                    seen_at[j * watched.len() + k] = Some(now);
                } else {
                    all = false;
                }
            }
        }
        all
    })
    .await;
    let spread: Vec<f64> = seen_at.iter().flatten().map(|d| d.as_secs_f64() * 1e3).collect();

    // Members that are not the first nor overloaded are killed at once, as a rack would go.
    let victims: Vec<usize> = order[overloaded.len()..].iter().copied().filter(|&i| i != 0).take(KILLED).collect();
    let dead: Vec<SocketAddr> = victims.iter().map(|&i| members[i].me().gossip).collect();
    let killed = Instant::now();
    let mut victims_desc = victims.clone();
    victims_desc.sort_unstable_by(|a, b| b.cmp(a));
    for i in victims_desc {
        members.remove(i).kill();
    }
    let known = |heard: &Heard, v: &SocketAddr| -> Vec<Instant> { heard.deaths.lock().unwrap().iter().filter(|d| d.1 == *v).map(|d| d.2).collect() };
    let live = n - dead.len();
    until("every member knows the killed ones are dead", Duration::from_secs(30), || dead.iter().all(|v| known(&heard, v).len() >= live)).await;
    let since = |t: &Instant| t.duration_since(killed).as_secs_f64();
    // Detected: the first member declares it dead (every killed one, so the slowest of them);
    // known: the last member learns it.
    let first = dead.iter().map(|v| known(&heard, v).iter().map(since).fold(f64::MAX, f64::min)).fold(0.0, f64::max);
    let all = dead.iter().map(|v| known(&heard, v).iter().map(since).fold(0.0, f64::max)).fold(0.0, f64::max);

    let false_deaths = heard.deaths.lock().unwrap().iter().filter(|d| !dead.contains(&d.1)).count() as u64;
    let refused = members.iter().map(|g| g.traffic().refused.load(Ordering::Relaxed)).sum();
    let seconds = began.elapsed().as_secs_f64();
    for g in members {
        g.kill();
    }
    Run {
        n,
        join_s: join.as_secs_f64(),
        msgs_per_s: (m1 - m0) as f64 / per,
        bytes_per_s: (b1 - b0) as f64 / per,
        cpu_us_per_s: (c1 - c0) * 1e6 / per,
        spread_p50_ms: percentile(&spread, 0.5),
        spread_p99_ms: percentile(&spread, 0.99),
        detect_first_s: first,
        detect_all_s: all,
        false_deaths,
        rejoins: heard.rejoins.load(Ordering::Relaxed),
        refused,
        seconds,
    }
}

async fn listen(i: usize, mut events: mpsc::UnboundedReceiver<Event>, heard: Arc<Heard>) {
    while let Some(e) = events.recv().await {
        match e {
            Event::Down(m) => heard.deaths.lock().unwrap().push((i, m.gossip, Instant::now())),
            Event::Rejoined(_) => drop(heard.rejoins.fetch_add(1, Ordering::Relaxed)),
            Event::Up(_) => {}
        }
    }
}

/// `cargo xtask bench cluster [--members | --agents] [--json]`: both parts, or one.
pub fn cluster(json: bool, args: &[String]) {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    let only = |part: &str| args.iter().any(|a| a == part);
    let mut v = serde_json::Map::new();
    if !only("--agents") {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
        let mut runs = Vec::new();
        for n in SIZES {
            eprintln!("a cluster of {n} members...");
            runs.push(rt.block_on(run(n)));
        }
        drop(rt);
        v.extend(members_table(&runs));
    }
    if !only("--members") {
        let agents = negotiation::runs(&SIZES);
        if v.is_empty() {
            println!();
        }
        v.extend(agents_table(&agents));
    }
    if json {
        println!("{}", serde_json::Value::Object(v));
    }
}

/// Prints the membership's table; its figures for `--json`.
#[expect(clippy::cast_precision_loss, reason = "members and seconds as member-hours")]
fn members_table(runs: &[Run]) -> serde_json::Map<String, serde_json::Value> {
    println!("Gossip membership, every member a task in this process over loopback (foca SWIM, HMAC-authenticated UDP):");
    println!(
        "  {:>6} {:>8} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7}",
        "members", "join s", "msgs/s", "bytes/s", "CPU us/s", "spread p50", "spread p99", "detected", "known all", "false", "refused"
    );
    for r in runs {
        println!(
            "  {:>6} {:>8.1} {:>10.2} {:>10.0} {:>8.0} {:>8.0}ms {:>8.0}ms {:>9.2}s {:>9.2}s {:>7} {:>7}",
            r.n,
            r.join_s,
            r.msgs_per_s,
            r.bytes_per_s,
            r.cpu_us_per_s,
            r.spread_p50_ms,
            r.spread_p99_ms,
            r.detect_first_s,
            r.detect_all_s,
            r.false_deaths + r.rejoins,
            r.refused
        );
    }
    let (small, large) = (&runs[0], &runs[runs.len() - 1]);
    let traffic = large.bytes_per_s / small.bytes_per_s;
    let hours: f64 = runs.iter().map(|r| r.seconds * r.n as f64 / 3600.0).sum();
    let false_deaths: u64 = runs.iter().map(|r| r.false_deaths + r.rejoins).sum();
    println!("  traffic per member at rest, {} vs {} members: {traffic:.2}x (goal: at most 1.5x)", large.n, small.n);
    println!("  CPU per member at rest, {} vs {} members: {:.2}x", large.n, small.n, large.cpu_us_per_s / small.cpu_us_per_s);
    println!(
        "  {KILLED} members killed at once: each declared dead within {:.2} s (goal: under 5 s), known dead by all {} others within {:.2} s",
        large.detect_first_s,
        large.n - KILLED,
        large.detect_all_s
    );
    println!("  false deaths: {false_deaths} in {hours:.1} member-hours (goal: none)");
    let v = serde_json::json!({
        "traffic_1000_vs_10": traffic,
        "cpu_1000_vs_10": large.cpu_us_per_s / small.cpu_us_per_s,
        "detect_s": large.detect_first_s,
        "known_by_all_s": large.detect_all_s,
        "false_deaths": false_deaths,
        "spread_p99_ms_1000": large.spread_p99_ms,
        "join_s_1000": large.join_s,
    });
    v.as_object().cloned().unwrap_or_default()
}

/// Prints the negotiation's table; its figures for `--json`.
fn agents_table(agents: &[negotiation::Run]) -> serde_json::Map<String, serde_json::Value> {
    println!("Negotiation, every node a real agent (gossip, sampled help requests, mutual-TLS hand-overs) on an in-memory datapath, a tenth overloaded at once:");
    println!("  {:>6} {:>14} {:>10} {:>10} {:>10} {:>8} {:>10} {:>9} {:>8}", "agents", "joined", "CPU us/s", "shed p50", "shed p99", "unshed", "max/mean", "over high", "rounds");
    for r in agents {
        let Some(join) = r.join_s else {
            println!("  {:>6} {:>14} {:>10.0}   (CPU while joining) not measured: not every agent knew every other (the least knew {})", r.n, "no", r.cpu_us_per_s, r.least_known);
            continue;
        };
        println!(
            "  {:>6} {:>13.1}s {:>10.0} {:>8.1}ms {:>8.1}ms {:>8} {:>10.2} {:>9} {:>8}",
            r.n,
            join,
            r.cpu_us_per_s,
            r.p(0.5),
            r.p(0.99),
            r.unshed,
            r.max_over_mean,
            r.over_high,
            r.shed_ms.len()
        );
    }
    // The largest cluster that joined, against the smallest.
    let first = &agents[0];
    let big = agents.iter().rev().find(|r| r.join_s.is_some()).unwrap_or(first);
    let p99_1000 = agents.iter().find(|r| r.n == 1000 && r.join_s.is_some()).map(|r| r.p(0.99));
    println!(
        "  threshold crossing to rules installed at {} agents: p50 {:.1} ms, p99 {:.1} ms (goal: p99 under 50 ms at 1,000); {:.2}x the p99 at {} agents",
        big.n,
        big.p(0.5),
        big.p(0.99),
        big.p(0.99) / first.p(0.99),
        first.n
    );
    // At rest: the largest cluster that joined.
    let cpu_big = big;
    println!(
        "  CPU per agent at rest, {} vs {} agents: {:.2}x; at {:.0} us a second each, 1,000 agents would need {:.2} cores at rest, joining aside",
        cpu_big.n,
        first.n,
        cpu_big.cpu_us_per_s / first.cpu_us_per_s,
        cpu_big.cpu_us_per_s,
        cpu_big.cpu_us_per_s * 1000.0 / 1e6
    );
    let v = serde_json::json!({
        "p99_ms_1000": p99_1000,
        "negotiation_largest_n": big.n,
        "negotiation_p50_ms": big.p(0.5),
        "negotiation_p99_ms": big.p(0.99),
        "negotiation_unshed": big.unshed,
        "negotiation_max_over_mean": big.max_over_mean,
        "negotiation_over_high": big.over_high,
        "agent_cpu_us_per_s_at_rest": cpu_big.cpu_us_per_s,
    });
    v.as_object().cloned().unwrap_or_default()
}
