//! `cargo xtask demo`: the whole story on one machine. Three servers (network namespaces on a
//! bridge) run the demo HTTP application and a redirector agent each; 200 client addresses
//! send keep-alive requests to server A until it passes its connection threshold; A's agent
//! asks its siblings for help, B and C volunteer, the clients' sessions move to them and the
//! kernel steers the clients' new connections. At the end: requests per server, clients moved,
//! failed requests, and whether every session counter stayed continuous.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redirector_tests::{
    agents::{Cluster, DemoApp},
    http::HttpClient,
    net::{SERVICE4, client4},
};

const CLIENTS: u16 = 200;
const SECONDS: u64 = 10;

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("error: the demo needs root (network namespaces, eBPF)");
        std::process::exit(1);
    }
    let node = std::env::args().any(|a| a == "--node");
    let kind = if node { DemoApp::Node } else { DemoApp::Rust };
    println!("redirector demo: servers that share load among themselves, sessions included.\n");
    println!("[1] building the test network: servers A, B, C and a client host with {CLIENTS} addresses (198.18.0.0/15)");
    println!("[2] starting on each server the demo HTTP application ({}) and a redirector agent", if node { "Node.js" } else { "Rust" });
    println!("    A: high watermark 150 connections, low 100; B and C: high 70, low 50");
    let c = Cluster::with_demo_app(kind, CLIENTS, &[("a", 150, 100), ("b", 70, 50), ("c", 70, 50)]);
    println!("    agents up, mutual TLS links established, applications registered on their hooks");
    let dst = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    println!("\n[3] {CLIENTS} clients send keep-alive requests to A ({dst}) for {SECONDS} s; each response carries its session counter");
    let total = Arc::new(AtomicU64::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let threads: Vec<_> = (0..20u16)
        .map(|t| {
            let (ns, total, results) = (c.t.client.ns.clone(), total.clone(), results.clone());
            std::thread::spawn(move || {
                let mut clients: Vec<HttpClient> = (1..=10).map(|i| HttpClient::new(&ns, IpAddr::V4(client4(t * 10 + i)), dst)).collect();
                while Instant::now() < deadline {
                    for cl in &mut clients {
                        cl.request();
                    }
                    total.fetch_add(10, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
                results.lock().expect("lock").extend(clients);
            })
        })
        .collect();
    let start = Instant::now();
    let mut reported = 0;
    while start.elapsed() < Duration::from_secs(SECONDS) {
        std::thread::sleep(Duration::from_secs(1));
        let a = c.status("a");
        let moved = a["migrated_out"].as_array().map_or(0, Vec::len);
        let loads: Vec<String> = ["a", "b", "c"].iter().map(|n| format!("{}={}", n.to_uppercase(), c.status(n)["load"])).collect();
        println!("    t={:>2}s  requests {:>6}  connections {}  clients moved by A: {moved}", start.elapsed().as_secs(), total.load(Ordering::Relaxed), loads.join(" "));
        if moved > reported {
            for line in c.log("a").lines().filter(|l| l.contains("hand-over committed") || l.contains("over the high watermark")).skip(reported.min(1)) {
                println!("      agent A: {}", line.split_once("  ").map_or(line, |x| x.1).trim());
            }
            reported = moved;
        }
    }
    for t in threads {
        t.join().expect("client thread");
    }
    let clients = results.lock().expect("lock");
    let requests: u64 = clients.iter().map(|c| c.requests).sum();
    let failed: usize = clients.iter().map(|c| c.failures.len()).sum();
    let broken: usize = clients.iter().map(|c| c.breaks.len()).sum();
    let retried: u64 = clients.iter().map(|c| c.retries).sum();
    let mut per_server: HashMap<String, u64> = HashMap::new();
    for cl in clients.iter() {
        for (s, n) in &cl.servers {
            *per_server.entry(s.clone()).or_default() += n;
        }
    }
    let moved_to = |s: &str| clients.iter().filter(|c| c.servers.contains_key(s)).count();
    let continuous = clients.iter().all(|c| c.breaks.is_empty());
    println!("\n[4] summary");
    println!("    requests           {requests}");
    for s in ["A", "B", "C"] {
        println!("    served by {s}        {}", per_server.get(s).copied().unwrap_or(0));
    }
    println!("    clients moved      {} to B, {} to C (their new connections steered by the kernel; they still talk to {dst})", moved_to("B"), moved_to("C"));
    println!("    failed requests    {failed} (retried once on a connection closed before any answer, as browsers do: {retried})");
    println!(
        "    session counters   {}",
        if continuous { "continuous for every client (each request counted exactly once, across the move)".to_string() } else { format!("BROKEN {broken} time(s)") }
    );
    for p in clients.iter().flat_map(|c| c.failures.iter().chain(&c.breaks)).take(10) {
        println!("      {p}");
    }
    println!("\ndone: the namespaces, agents and applications are removed now.");
    if failed > 0 || broken > 0 {
        std::process::exit(1);
    }
}
