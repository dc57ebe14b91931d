//! The negotiation part of `cargo xtask bench cluster`: N real agents (`redirector::agent`:
//! gossip membership, sampled help requests with leases, mutual-TLS links opened on demand,
//! the hand-over and its records) as tasks in this process over loopback, each on an
//! in-memory datapath (`redirector::plane::memory`) instead of the kernel's. The bench plays
//! the clients: it sets each node's load, and moves a client's connections to the node its
//! origin's rule steers it to, as new connections would go.
//!
//! A tenth of the nodes pass their high watermark at once; measured: threshold crossing to
//! the round's rules installed (the agent's own `last_shed_ms`, what `redirector status`
//! shows), rounds that installed nothing, and how evenly the load ends up spread.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use rand::{RngExt as _, seq::SliceRandom as _};
use redirector::{
    agent::Agent,
    config::Config,
    datapath::{RuleState, monotonic_ns},
    plane::memory::Memory,
};

use crate::{cpu, percentile};

/// Every node's watermarks.
const HIGH: u64 = 100;
const LOW: u64 = 80;
/// Client addresses of each node.
const CLIENTS: usize = 16;
/// Heartbeats on the links (3 on standby per node), and how long a silent link lasts: a
/// thousand agents' 3,000 links at the default 500 ms took a fifth of the two cores.
const HEARTBEAT_MS: u64 = 2000;
const LIVENESS_MS: u64 = 6000;
/// How long the agents of a cluster of `n` have to join.
fn join_limit(n: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(150) * u32::try_from(n).expect("a small cluster")
}

/// An overloaded node's load.
const OVER: u64 = 130;

/// What one cluster size gave.
pub struct Run {
    pub n: usize,
    /// How long until every agent knew every other and its room; none if that did not
    /// happen within [`join_limit`] (then nothing else is measured but the CPU).
    pub join_s: Option<f64>,
    /// Then: the fewest members an agent knew (itself included).
    pub least_known: usize,
    /// Crossing to rules installed, per overloaded node, in ms.
    pub shed_ms: Vec<f64>,
    /// Overloaded nodes that installed no rule within the wait.
    pub unshed: usize,
    /// Largest load over the mean, once the clients moved.
    pub max_over_mean: f64,
    /// Nodes over their high watermark once the clients moved.
    pub over_high: usize,
    /// This process's CPU (all agents) per node and second, at rest before the overload.
    pub cpu_us_per_s: f64,
}

/// One node as the bench drives it.
struct Node {
    agent: Arc<Agent>,
    plane: Memory,
    control: IpAddr,
    /// Its own clients and their connections.
    clients: Vec<(IpAddr, u64)>,
}

/// Node `i`'s control address: a loopback address of its own (port 7470, gossip 7946).
fn control(i: usize) -> IpAddr {
    let i = u32::try_from(i).expect("a small cluster");
    IpAddr::V4(Ipv4Addr::new(127, 1, u8::try_from(i / 250).expect("under 64,000 nodes"), u8::try_from(i % 250 + 1).expect("a byte")))
}

/// Node `i`'s service and client addresses (documentation ranges, never sent to: no packet
/// leaves an in-memory datapath).
fn service(i: usize) -> SocketAddr {
    let [_, _, a, b] = u32::try_from(i).expect("a small cluster").to_be_bytes();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, a, b)), 80)
}

fn client(i: usize, k: usize) -> IpAddr {
    let x = u32::try_from(i * CLIENTS + k).expect("a small cluster");
    let [_, _, a, b] = x.to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(198, 19, a, b))
}

fn config(dir: &Path, i: usize, n: usize) -> PathBuf {
    let (name, tls) = (format!("n{i}"), dir.join("tls"));
    let node = dir.join(&name);
    std::fs::create_dir_all(&node).expect("a node folder");
    let mut s = format!(
        "node = \"{name}\"\nlisten = \"{}:7470\"\nheartbeat_ms = {HEARTBEAT_MS}\nliveness_ms = {LIVENESS_MS}\nhigh_watermark = {HIGH}\nlow_watermark = {LOW}\nhome_after_secs = 0\nstate_dir = \"{}\"\napp_socket = \"{}\"\nadmin_socket = \"{}\"\n\
         [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[cluster]\nmode = \"gossip\"\nexpected_members = {n}\n",
        control(i),
        node.join("state").display(),
        node.join("app.sock").display(),
        node.join("admin.sock").display(),
        tls.join("ca.pem").display(),
        tls.join(format!("{name}.pem")).display(),
        tls.join(format!("{name}.key")).display(),
    );
    if i > 0 {
        s.push_str(&format!("[[cluster.seed]]\nname = \"n0\"\naddress = \"{}:7470\"\n", control(0)));
    }
    s.push_str(&format!("[[service]]\naddress = \"{}\"\ndev = \"lo\"\ncgroup = \"/sys/fs/cgroup\"\n", service(i)));
    let path = node.join("redirector.toml");
    std::fs::write(&path, s).expect("a configuration");
    path
}

/// Sets every node's load from where each client's new connections go: its origin's active
/// rule's target, else its origin. Returns the loads, by node.
fn place(nodes: &[Node], by_control: &HashMap<IpAddr, usize>) -> Vec<u64> {
    let mut loads: Vec<Vec<(IpAddr, u64)>> = vec![Vec::new(); nodes.len()];
    for (h, node) in nodes.iter().enumerate() {
        let steered: HashMap<IpAddr, usize> =
            node.plane.rules().into_iter().filter(|r| r.state == RuleState::Active).filter_map(|r| Some((r.prefix.addr, *by_control.get(&r.target)?))).collect();
        for &(c, conns) in &node.clients {
            loads[steered.get(&c).copied().unwrap_or(h)].push((c, conns));
        }
    }
    nodes
        .iter()
        .zip(loads)
        .map(|(node, l)| {
            let total = l.iter().map(|x| x.1).sum();
            node.plane.set_load(l);
            total
        })
        .collect()
}

/// Spreads `total` connections over [`CLIENTS`] clients, the first ones with one more.
fn spread(total: u64) -> impl Iterator<Item = u64> {
    let k = CLIENTS as u64;
    (0..k).map(move |j| total / k + u64::from(j < total % k))
}

#[expect(clippy::cast_precision_loss, reason = "loads and times as ratios")]
async fn run_size(n: usize, dir: &Path) -> Run {
    let tls = dir.join("tls");
    redirector::certs::make_ca(&tls, 2).expect("a CA");
    for i in 0..n {
        redirector::certs::make_node(&tls, &format!("n{i}"), 1).expect("a node certificate");
    }
    let mut rng = rand::rng();
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = Config::load(&config(dir, i, n)).expect("a configuration").validate().unwrap_or_else(|e| panic!("node {i}: {e}"));
        let plane = Memory::new().expect("an in-memory datapath");
        let base = rng.random_range(30..70);
        let clients: Vec<(IpAddr, u64)> = spread(base).enumerate().map(|(k, c)| (client(i, k), c)).collect();
        plane.set_load(clients.iter().copied());
        let agent = Agent::with_plane(cfg, Box::new(plane.clone()), Box::new(plane.clone())).expect("an agent");
        nodes.push(Node { agent, plane, control: control(i), clients });
    }
    let by_control: HashMap<IpAddr, usize> = nodes.iter().enumerate().map(|(i, x)| (x.control, i)).collect();
    // A hundred a second, as a fleet would come up, not all in one instant.
    for (i, node) in nodes.iter().enumerate() {
        if i % 100 == 1 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        node.agent.start().await.unwrap_or_else(|e| panic!("agent {i} starts: {e:#}"));
    }
    // Joined: every node holds every other live, with its room (its status read as
    // `redirector status` reads it).
    let began = Instant::now();
    let mut joined = vec![false; n];
    let mut least_known = 1;
    while joined.iter().any(|j| !j) && began.elapsed() < join_limit(n) {
        // Not more often: a status lists every member, and a thousand of them every 2 s took
        // a tenth of the CPU the agents need to join.
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Members known (itself included) and rooms unknown, of those not joined yet.
        let (mut known, mut roomless) = (Vec::new(), Vec::new());
        for (i, node) in nodes.iter().enumerate() {
            if !joined[i] {
                let st = node.agent.status().await;
                let (members, rooms) = st.cluster.map_or((0, 0), |c| (c.members.len(), c.members.iter().filter(|m| m.room.is_some()).count()));
                joined[i] = members == n - 1 && rooms == members;
                if !joined[i] {
                    known.push(members + 1);
                    roomless.push(members - rooms);
                }
            }
        }
        if joined.iter().all(|j| *j) {
            break;
        }
        known.sort_unstable();
        roomless.sort_unstable();
        least_known = known[0];
        eprintln!(
            "  {:.0} s: {} of {n} know every other and its room; the others know {} / {} / {} members (least / tenth / median) and lack {} / {} rooms (median / most)",
            began.elapsed().as_secs_f64(),
            joined.iter().filter(|j| **j).count(),
            known[0],
            known[known.len() / 10],
            known[known.len() / 2],
            roomless[roomless.len() / 2],
            roomless[roomless.len() - 1]
        );
    }
    let join = joined.iter().all(|j| *j).then(|| began.elapsed().as_secs_f64());
    let c0 = cpu::own_seconds();
    let rest = Duration::from_secs(5);
    tokio::time::sleep(rest).await;
    let cpu_us_per_s = (cpu::own_seconds() - c0) * 1e6 / (rest.as_secs_f64() * n as f64);
    if join.is_none() {
        eprintln!("  {n} agents did not all join within {:.0} s: not measured further", join_limit(n).as_secs_f64());
        return Run { n, join_s: None, least_known, shed_ms: Vec::new(), unshed: 0, max_over_mean: 0.0, over_high: 0, cpu_us_per_s };
    }

    // A tenth pass their high watermark at once.
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let overloaded: Vec<usize> = order[..(n / 10).max(1)].to_vec();
    let t0 = monotonic_ns();
    for &i in &overloaded {
        nodes[i].clients = spread(OVER).enumerate().map(|(k, c)| (client(i, k), c)).collect();
    }
    let mut loads = place(&nodes, &by_control);
    // Rounds end (rules installed, the agent's own measure read back), the clients moving as
    // the rules say meanwhile.
    let mut shed: HashMap<usize, f64> = HashMap::new();
    let wait = Instant::now();
    while shed.len() < overloaded.len() && wait.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        loads = place(&nodes, &by_control);
        for &i in &overloaded {
            if shed.contains_key(&i) || !nodes[i].plane.installed_ns().iter().any(|(_, at)| *at >= t0) {
                continue;
            }
            let st = nodes[i].agent.status().await;
            if let (false, Some(ms)) = (st.shedding, st.last_shed_ms) {
                shed.insert(i, ms);
            }
        }
    }
    // Settled: no rule changes for a second.
    let mut settled = Instant::now();
    let mut last = loads.clone();
    while settled.elapsed() < Duration::from_secs(1) && wait.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        loads = place(&nodes, &by_control);
        if loads != last {
            settled = Instant::now();
            last = loads.clone();
        }
    }
    for (i, l) in loads.iter().enumerate().filter(|(_, l)| **l > HIGH) {
        let rules = nodes[i].plane.rules().len();
        eprintln!(
            "  n{i} ends over its high watermark: {l} connections ({}; {rules} rules of its own)",
            if overloaded.contains(&i) { "one of those overloaded" } else { "a volunteer" }
        );
    }
    let mean = loads.iter().sum::<u64>() as f64 / n as f64;
    let max = loads.iter().copied().max().unwrap_or(0) as f64;
    Run {
        n,
        join_s: join,
        least_known: n,
        shed_ms: shed.values().copied().collect(),
        unshed: overloaded.len() - shed.len(),
        max_over_mean: max / mean,
        over_high: loads.iter().filter(|l| **l > HIGH).count(),
        cpu_us_per_s,
    }
}

/// Runs a cluster of each size on a runtime of its own (dropped after: every agent's tasks
/// and sockets end with it).
pub fn runs(sizes: &[usize]) -> Vec<Run> {
    sizes
        .iter()
        .map(|&n| {
            eprintln!("{n} agents on in-memory datapaths...");
            let dir = std::env::temp_dir().join(format!("redirector-bench-cluster-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
            let r = rt.block_on(run_size(n, &dir));
            rt.shutdown_timeout(Duration::from_secs(2));
            let _ = std::fs::remove_dir_all(&dir);
            r
        })
        .collect()
}

impl Run {
    /// The `q`-quantile of the rounds' times (NaN if none ended).
    pub fn p(&self, q: f64) -> f64 {
        if self.shed_ms.is_empty() { f64::NAN } else { percentile(&self.shed_ms, q) }
    }
}
