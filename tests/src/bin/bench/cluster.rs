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
    /// Deaths of members not killed, as each member heard them, and members told they had been
    /// declared dead ([`Event::Rejoined`]).
    false_deaths: u64,
    refused: u64,
    seconds: f64,
}

/// Deaths heard, by whom, when.
#[derive(Default)]
struct Heard {
    deaths: Mutex<Vec<(usize, SocketAddr, Instant)>>,
    rejoins: AtomicU64,
}

impl Heard {
    /// Deaths heard of members not `killed`, and members that heard they were declared dead.
    fn false_deaths(&self, killed: &[SocketAddr]) -> u64 {
        let deaths = self.deaths.lock().unwrap().iter().filter(|d| !killed.contains(&d.1)).count() as u64;
        deaths + self.rejoins.load(Ordering::Relaxed)
    }
}

/// A wait that ran out: what was waited for and how far it got, and the false deaths until then
/// (as [`Run::false_deaths`] counts them).
struct Missed {
    what: String,
    false_deaths: u64,
    /// From the first member's start to the wait's end.
    seconds: f64,
}

impl Missed {
    fn new(what: String) -> Self {
        Self { what, false_deaths: 0, seconds: 0.0 }
    }

    fn with(self, heard: &Heard, killed: &[SocketAddr], began: Instant) -> Self {
        Self { false_deaths: heard.false_deaths(killed), seconds: began.elapsed().as_secs_f64(), ..self }
    }
}

/// Waits until `done(i)` holds for every member `i` at once, checking every `every` only the
/// members it did not hold for yet, then all of them again (the bench shares the cores with
/// the members it watches: every member's list of members copied every 10 ms was up to a
/// million records a poll at 1,000). Says how far it got every 10 s, and when it gives up.
async fn until_all(what: &str, within: Duration, n: usize, every: Duration, mut done: impl FnMut(usize) -> bool) -> Result<Duration, Missed> {
    let t = Instant::now();
    let mut pending: Vec<usize> = (0..n).collect();
    let mut told = Instant::now();
    loop {
        pending.retain(|&i| !done(i));
        if pending.is_empty() {
            pending = (0..n).filter(|&i| !done(i)).collect();
            if pending.is_empty() {
                return Ok(t.elapsed());
            }
        }
        if t.elapsed() > within {
            return Err(Missed::new(format!("{what}: not within {} s ({} of {n} members not)", within.as_secs(), pending.len())));
        }
        if told.elapsed() > Duration::from_secs(10) {
            eprintln!("  {what}: {} of {n} members not yet, {:.0} s", pending.len(), t.elapsed().as_secs_f64());
            told = Instant::now();
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until `done()`, checked every 10 ms.
async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Result<Duration, Missed> {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > within {
            return Err(Missed::new(format!("{what}: not within {} s", within.as_secs())));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(t.elapsed())
}

fn sent(members: &[Gossip]) -> (u64, u64) {
    members.iter().fold((0, 0), |(m, b), g| (m + g.traffic().sent.load(Ordering::Relaxed), b + g.traffic().sent_bytes.load(Ordering::Relaxed)))
}

#[expect(clippy::cast_precision_loss, reason = "counts of messages as rates")]
async fn run(n: usize) -> Result<Run, Missed> {
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
    // Checked every 100 ms: the time to join is tens of seconds at 1,000 members.
    let every = Duration::from_millis(100);
    // Until members are killed, every death heard is a false one.
    let missed = |m: Missed| m.with(&heard, &[], began);
    let join = until_all("every member sees every other", Duration::from_secs(180), n, every, |i| members[i].known().0 == n - 1).await.map_err(missed)?;

    for g in &members {
        let _ = g.set_load(rng.random_range(30..70), HIGH);
    }
    // Every member passes each of the n records on 5 + 2 ln(n) times, a few dozen to a
    // datagram: about 50 s at 1,000 members here (60 s was once too short).
    let rooms = until_all("every member knows every other's room", Duration::from_secs(180), n, every, |i| members[i].known() == (n - 1, n - 1)).await.map_err(missed)?;
    eprintln!("  {n} members: every room known by all {:.1} s after all published", rooms.as_secs_f64());
    // At rest: no member has an update left to pass on.
    until_all("every member passed every update on", Duration::from_secs(120), n, every, |i| members[i].traffic().backlog.load(Ordering::Relaxed) == 0).await.map_err(missed)?;

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
    // Each (member, overloaded member) pair not seen full yet, looked up by name (not a copy of
    // the member's view: 100,000 pairs at 1,000 members).
    let names: Vec<String> = overloaded.iter().map(|&i| members[i].me().name.clone()).collect();
    let mut unseen: Vec<(usize, usize)> = (0..n).flat_map(|j| (0..names.len()).map(move |k| (j, k))).filter(|&(j, k)| overloaded[k] != j).collect();
    let mut spread: Vec<f64> = Vec::with_capacity(unseen.len());
    until("every member sees the overloaded members full", Duration::from_secs(30), || {
        let now = changed.elapsed().as_secs_f64() * 1e3;
        unseen.retain(|&(j, k)| {
            let full = members[j].room_of(&names[k]) == Some(0);
            if full {
                spread.push(now);
            }
            !full
        });
        unseen.is_empty()
    })
    .await
    .map_err(missed)?;

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
    until("every member knows the killed ones are dead", Duration::from_secs(30), || dead.iter().all(|v| known(&heard, v).len() >= live))
        .await
        .map_err(|m| m.with(&heard, &dead, began))?;
    let since = |t: &Instant| t.duration_since(killed).as_secs_f64();
    // Detected: the first member declares it dead (every killed one, so the slowest of them);
    // known: the last member learns it.
    let first = dead.iter().map(|v| known(&heard, v).iter().map(since).fold(f64::MAX, f64::min)).fold(0.0, f64::max);
    let all = dead.iter().map(|v| known(&heard, v).iter().map(since).fold(0.0, f64::max)).fold(0.0, f64::max);

    let false_deaths = heard.false_deaths(&dead);
    let refused = members.iter().map(|g| g.traffic().refused.load(Ordering::Relaxed)).sum();
    let seconds = began.elapsed().as_secs_f64();
    for g in members {
        g.kill();
    }
    Ok(Run {
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
        refused,
        seconds,
    })
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
            let r = rt.block_on(run(n));
            if let Err(missed) = &r {
                eprintln!("  {n} members not measured: {}", missed.what);
            }
            runs.push((n, r));
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

/// Prints the membership's table; its figures for `--json` (null for a size not measured).
#[expect(clippy::cast_precision_loss, reason = "members and seconds as member-hours")]
fn members_table(runs: &[(usize, Result<Run, Missed>)]) -> serde_json::Map<String, serde_json::Value> {
    println!("Gossip membership, every member a task in this process over loopback (foca SWIM, HMAC-authenticated UDP):");
    println!(
        "  {:>6} {:>8} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7}",
        "members", "join s", "msgs/s", "bytes/s", "CPU us/s", "spread p50", "spread p99", "detected", "known all", "false", "refused"
    );
    for (n, r) in runs {
        let r = match r {
            Ok(r) => r,
            Err(missed) => {
                println!("  {n:>6} not measured: {}; {} false deaths heard until then", missed.what, missed.false_deaths);
                continue;
            }
        };
        println!(
            "  {:>6} {:>8.1} {:>10.2} {:>10.0} {:>8.0} {:>8.0}ms {:>8.0}ms {:>9.2}s {:>9.2}s {:>7} {:>7}",
            r.n, r.join_s, r.msgs_per_s, r.bytes_per_s, r.cpu_us_per_s, r.spread_p50_ms, r.spread_p99_ms, r.detect_first_s, r.detect_all_s, r.false_deaths, r.refused
        );
    }
    // Every run's, those that ran out of time too.
    let (false_deaths, hours) = runs.iter().fold((0, 0.0), |(d, h), (n, r)| {
        let (deaths, seconds) = r.as_ref().map_or_else(|m| (m.false_deaths, m.seconds), |r| (r.false_deaths, r.seconds));
        (d + deaths, h + seconds * *n as f64 / 3600.0)
    });
    println!("  false deaths: {false_deaths} in {hours:.1} member-hours (goal: none)");
    // The largest size against the smallest, if both were measured.
    let (Some(small), Some(large)) = (runs.first().and_then(|r| r.1.as_ref().ok()), runs.last().and_then(|r| r.1.as_ref().ok())) else {
        println!("  traffic, CPU and detection at {} members: not measured", SIZES[SIZES.len() - 1]);
        let v = serde_json::json!({ "traffic_1000_vs_10": null, "cpu_1000_vs_10": null, "detect_s": null, "known_by_all_s": null, "false_deaths": false_deaths, "spread_p99_ms_1000": null, "join_s_1000": null });
        return v.as_object().cloned().unwrap_or_default();
    };
    let traffic = large.bytes_per_s / small.bytes_per_s;
    println!("  traffic per member at rest, {} vs {} members: {traffic:.2}x (goal: at most 1.5x)", large.n, small.n);
    println!("  CPU per member at rest, {} vs {} members: {:.2}x", large.n, small.n, large.cpu_us_per_s / small.cpu_us_per_s);
    println!(
        "  {KILLED} members killed at once: each declared dead within {:.2} s (goal: under 5 s), known dead by all {} others within {:.2} s",
        large.detect_first_s,
        large.n - KILLED,
        large.detect_all_s
    );
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
