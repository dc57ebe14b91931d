//! `cargo xtask bench compare [--json]`: redirector next to what users pick instead, in one
//! run on one topology. A client namespace, origin A and server B (the Rust demo application,
//! HTTP) joined by a bridge; three paths to B's application:
//!
//! - **direct**: the client connects to B's own address;
//! - **redirector**: the client connects to A's service address; A's classifier steers the
//!   migrated client to B (IP-in-IP, in A's kernel), B answers the client directly;
//! - **proxy**: the client connects to HAProxy on A (TCP mode, [`HAPROXY_CFG`]), which opens
//!   its own connection to B and copies both ways.
//!
//! For each path, rounds of `wrk` (one thread, [`CONNS`] connections, [`ROUND`] each, paths
//! alternating their order round by round; medians): requests/s with keep-alive and with a new
//! connection per request (`Connection: close`, the server closes first), p50 and p99 latency,
//! and A's CPU per 1,000 requests; then a bulk download of [`BULK`] bytes through each path.
//!
//! Everything is measured twice, in two layouts ([`Layout`]):
//!
//! - **shared**: the kernel places the work (no pinning, no steering), as on one box that
//!   runs all three hosts; the request rates, latencies and download speeds come from here;
//! - **A apart**: A gets a CPU of its own, as a separate box would: receive packet steering
//!   (RPS) sends every packet that arrives at A's interface to CPU 1, where A's softirq (the
//!   classifier, the encapsulation, A's TCP stack for the proxy) runs, and HAProxy is pinned
//!   there; every other interface's packets are steered to CPU 0, where the load generator and
//!   B's application are pinned. A's CPU is CPU 1's busy time in `/proc/stat` (user, system,
//!   irq and softirq), less what it spent when idle before; A's CPU figures come from here.
//!   Every packet through A then crosses between the CPUs twice (on a VM an inter-processor
//!   interrupt each way), which slows the paths through A; its rates are printed too.
//!
//! Then, in the same run, the classifier at scale ([`crate::scale::classifier_scale`]) and the
//! XDP fast path next to the classifier ([`crate::xdp::measure`]), so that `--json` holds every
//! headline of the comparison in one object.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redirector_tests::{
    Topology,
    app::connect_tcp,
    io::read_some,
    net::{SERVICE4, client4, sh},
};

use crate::median;

/// Rounds of each measurement (each path once per round).
const ROUNDS: usize = 3;
/// Length of one `wrk` run.
const ROUND: Duration = Duration::from_secs(3);
/// Concurrent connections of the load generator.
const CONNS: u32 = 32;
/// The bulk download's size.
const BULK: u64 = 256 << 20;
/// A's CPU, and everyone else's.
const A_CPU: usize = 1;
const REST_CPU: usize = 0;

/// HAProxy as usually tuned for plain TCP forwarding: one thread per core it is given (one
/// here, pinned to A's CPU), kernel splicing where it pays (`splice-auto`), no logging, and
/// room for every connection; the backend connection opens only once the client sent data
/// (`tcp-smart-connect`).
const HAPROXY_CFG: &str = "global
    maxconn 4096
    nbthread 1
defaults
    mode tcp
    option splice-auto
    option tcp-smart-connect
    option dontlognull
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind {A}:80
    default_backend back
backend back
    server b {B}:80
";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Way {
    Direct,
    Redirector,
    Proxy,
}

const WAYS: [Way; 3] = [Way::Direct, Way::Redirector, Way::Proxy];

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::Redirector => "redirector",
            Way::Proxy => "proxy",
        }
    }
}

/// One `wrk` run.
#[derive(Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// A's CPU per 1,000 requests, ms.
    a_cpu_ms: f64,
    errors: u64,
}

/// Medians of a way's samples in one mode.
#[derive(Clone, Copy, Default)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    a_cpu_ms: f64,
    errors: u64,
}

impl Figures {
    fn of(samples: &[Sample]) -> Self {
        Self {
            rps: median(samples.iter().map(|s| s.rps).collect()),
            p50_ms: median(samples.iter().map(|s| s.p50_ms).collect()),
            p99_ms: median(samples.iter().map(|s| s.p99_ms).collect()),
            a_cpu_ms: median(samples.iter().map(|s| s.a_cpu_ms).collect()),
            errors: samples.iter().map(|s| s.errors).sum(),
        }
    }
}

/// A process killed and reaped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU `cpu`'s busy time so far (user, nice, system, irq, softirq), in ms.
fn busy_ms(cpu: usize) -> f64 {
    crate::cpu::ticks_ms(crate::cpu::CpuTicks::of(cpu).busy())
}

/// Steers the packets arriving at `dev` in `ns` to CPU `cpu` (RPS, every receive queue), or
/// lets them be processed where they arrive.
fn steer_rx(ns: &str, dev: &str, cpu: Option<usize>) {
    let mask = cpu.map_or_else(|| "0".to_string(), |c| format!("{:x}", 1u32 << c));
    let script = format!("for q in /sys/class/net/{dev}/queues/rx-*; do echo {mask} > $q/rps_cpus; done");
    sh(&["ip", "netns", "exec", ns, "sh", "-c", &script]);
}

/// The time of one of `wrk`'s latency lines ("  99%    1.23ms"), in ms.
fn wrk_ms(out: &str, pct: &str) -> f64 {
    let v = out.lines().map(str::trim).find_map(|l| l.strip_prefix(pct).map(str::trim)).unwrap_or_else(|| panic!("no {pct} latency in wrk's output:\n{out}"));
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or_else(|_| panic!("bad latency {v:?}"));
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => panic!("unknown unit in latency {v:?}"),
    }
}

/// What `wrk` printed: requests/s, p50 and p99, and errors (socket errors and answers other
/// than 2xx/3xx).
fn parse_wrk(out: &str) -> (f64, f64, f64, u64) {
    let rps =
        out.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{out}"));
    let mut errors = 0;
    for l in out.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            errors += rest.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
        }
        if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    (rps, wrk_ms(out, "50%"), wrk_ms(out, "99%"), errors)
}

/// Where the work runs (see the module's documentation).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    Shared,
    Apart,
}

/// Sets the CPUs every thread of process `pid` may run on: `cpu`, or all of them.
fn pin(pid: u32, cpu: Option<usize>) {
    let mut set = nix::sched::CpuSet::new();
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    for c in (0..cpus).filter(|c| cpu.is_none_or(|x| x == *c)) {
        set.set(c).expect("cpu set");
    }
    for task in fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads").flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else { continue };
        // A thread that just ended cannot be pinned: nothing to do for it.
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
    }
}

struct Bench {
    /// B's application and HAProxy: stopped before the topology goes.
    procs: Vec<Running>,
    layout: Layout,
    t: Topology,
    dir: PathBuf,
    /// CPU 1's busy ms per second while idle.
    idle_rate: f64,
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.procs.clear();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Bench {
    /// Puts every host's work where `layout` says, and measures A's CPU's idle rate there.
    fn set_layout(&mut self, layout: Layout) {
        let (a, rest) = match layout {
            Layout::Shared => (None, None),
            Layout::Apart => (Some(A_CPU), Some(REST_CPU)),
        };
        let t = &self.t;
        steer_rx(&t.a.ns, "eth0", a);
        for h in [&t.b, &t.c, &t.client] {
            steer_rx(&h.ns, "eth0", rest);
        }
        for h in [&t.a, &t.b, &t.c, &t.client] {
            steer_rx(&t.switch, &h.ns, rest);
        }
        // B's application, then HAProxy.
        pin(self.procs[0].0.id(), rest);
        pin(self.procs[1].0.id(), a);
        self.layout = layout;
        self.idle_rate = 0.0;
        if layout == Layout::Apart {
            let ((), idle) = self.a_cpu(|| std::thread::sleep(Duration::from_secs(2)));
            self.idle_rate = idle / 2.0;
            if self.idle_rate > 50.0 {
                eprintln!("warning: CPU {A_CPU} is {:.0}% busy before the run; the machine is not quiet and A's CPU figures include that", self.idle_rate / 10.0);
            }
        }
    }

    /// The CPU the load generator and the downloading client run on.
    fn client_cpu(&self) -> Option<usize> {
        (self.layout == Layout::Apart).then_some(REST_CPU)
    }

    fn url(&self, way: Way) -> String {
        match way {
            Way::Direct => format!("http://{}/", self.t.b.v4[0]),
            Way::Redirector => format!("http://{SERVICE4}/"),
            Way::Proxy => format!("http://{}/", self.t.a.v4[0]),
        }
    }

    fn target(&self, way: Way) -> SocketAddr {
        let ip = match way {
            Way::Direct => self.t.b.v4[0],
            Way::Redirector => SERVICE4,
            Way::Proxy => self.t.a.v4[0],
        };
        SocketAddr::new(IpAddr::V4(ip), 80)
    }

    /// A's CPU (ms) spent while `f` ran, less its idle rate.
    fn a_cpu<T>(&self, f: impl FnOnce() -> T) -> (T, f64) {
        let (c0, t0) = (busy_ms(A_CPU), Instant::now());
        let v = f();
        let spent = busy_ms(A_CPU) - c0 - self.idle_rate * t0.elapsed().as_secs_f64();
        (v, spent.max(0.0))
    }

    fn wrk(&self, way: Way, new_conn: bool) -> Sample {
        let secs = format!("{}s", ROUND.as_secs());
        let conns = CONNS.to_string();
        let url = self.url(way);
        let cpu = self.client_cpu().map(|c| c.to_string());
        let mut args = vec!["netns", "exec", &self.t.client.ns];
        if let Some(cpu) = &cpu {
            args.extend(["taskset", "-c", cpu]);
        }
        args.extend(["wrk", "-t1", "-c", &conns, "-d", &secs, "--latency"]);
        if new_conn {
            args.extend(["-H", "Connection: close"]);
        }
        args.push(&url);
        let (out, cpu) = self.a_cpu(|| Command::new("ip").args(&args).output().expect("running wrk"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "wrk failed: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
        let (rps, p50_ms, p99_ms, errors) = parse_wrk(&stdout);
        let requests = rps * ROUND.as_secs_f64();
        Sample { rps, p50_ms, p99_ms, a_cpu_ms: cpu / (requests / 1000.0), errors }
    }

    /// Downloads [`BULK`] bytes through `way` (the client pinned to CPU 0): MB/s, and A's CPU
    /// per GB (ms).
    fn bulk(&self, way: Way) -> (f64, f64) {
        let dst = self.target(way);
        let src = IpAddr::V4(client4(1));
        let ns = self.t.client.ns.clone();
        let client_cpu = self.client_cpu();
        let ((bytes, secs), cpu) = self.a_cpu(|| {
            std::thread::spawn(move || {
                if let Some(c) = client_cpu {
                    let mut cpus = nix::sched::CpuSet::new();
                    cpus.set(c).expect("cpu set");
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).expect("pin the client");
                }
                let mut s = connect_tcp(&ns, src, dst).expect("connect for the download");
                s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
                let t0 = Instant::now();
                write!(s, "GET /download/{BULK} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").expect("request");
                let mut buf = vec![0u8; 256 << 10];
                let mut n = 0u64;
                loop {
                    match read_some(&mut s, &mut buf) {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(e) => panic!("download through {dst}: {e} after {n} bytes"),
                    }
                }
                (n, t0.elapsed().as_secs_f64())
            })
            .join()
            .expect("download")
        });
        assert!(bytes > BULK, "the download through {dst} ended early: {bytes} bytes");
        #[expect(clippy::cast_precision_loss, reason = "sizes are small")]
        let (mb, gb) = (BULK as f64 / 1e6, BULK as f64 / 1e9);
        (mb / secs, cpu / gb)
    }

    /// One plain request through `way`: which server answered.
    fn who(&self, way: Way) -> std::io::Result<String> {
        let mut s = connect_tcp(&self.t.client.ns, IpAddr::V4(client4(1)), self.target(way))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer.split("\"server\":\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default().to_string())
    }
}

/// Runs `cmd` in namespace `ns`, its output in `log`.
fn spawn(ns: &str, cmd: &[&str], log: &Path) -> Running {
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(fs::File::create(log).expect("log"))
        .stderr(fs::File::create(log.with_extension("err")).expect("log"))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    Running(child)
}

fn need(program: &str, package: &str) {
    if Command::new("which").arg(program).output().map(|o| o.status.success()).unwrap_or(false) {
        return;
    }
    eprintln!("error: `{program}` is not installed (Debian package {package}; `cargo xtask bench compare` installs it)");
    std::process::exit(1);
}

pub fn compare(json: bool) {
    need("wrk", "wrk");
    need("haproxy", "haproxy");
    let t = Topology::new(1);
    let dir = std::env::temp_dir().join(format!("{}-compare", t.prefix));
    fs::create_dir_all(&dir).expect("bench dir");
    let b_addr = t.b.v4[0];
    let demo = redirector_tests::agents::sibling_bin("redirector-demo-app");
    let b_listen = format!("{b_addr}:80");
    let b = spawn(&t.b.ns, &[&demo.to_string_lossy(), "--name", "B", "--listen", &b_listen], &dir.join("demo-b.log"));
    let cfg = HAPROXY_CFG.replace("{A}", &t.a.v4[0].to_string()).replace("{B}", &b_addr.to_string());
    let cfg_path = dir.join("haproxy.cfg");
    fs::write(&cfg_path, cfg).expect("haproxy config");
    let proxy = spawn(&t.a.ns, &["haproxy", "-db", "-f", &cfg_path.to_string_lossy()], &dir.join("haproxy.log"));
    // The redirector path: A steers its service, B adopted it, the client is migrated.
    t.steer_a_to_b_v4(80, 80);
    t.migrate(&client4(1).to_string(), IpAddr::V4(b_addr));
    let mut bench = Bench { procs: vec![b, proxy], layout: Layout::Shared, t, dir, idle_rate: 0.0 };
    let deadline = Instant::now() + Duration::from_secs(5);
    for way in WAYS {
        loop {
            let who = bench.who(way);
            if who.as_ref().is_ok_and(|w| w == "B") {
                break;
            }
            if Instant::now() > deadline {
                let logs: String = ["demo-b.err", "haproxy.err"].iter().map(|f| format!("{f}: {}\n", fs::read_to_string(bench.dir.join(f)).unwrap_or_default())).collect();
                panic!("the {} path does not reach B: {who:?}\n{logs}", way.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let shared = bench.measure(Layout::Shared);
    let apart = bench.measure(Layout::Apart);
    drop(bench);
    // The other headlines, measured in the same run: the classifier at scale, and the
    // XDP fast path next to it.
    eprintln!("measuring the classifier with {:?} migrated clients of each family...", crate::scale::SIZES);
    let scale = crate::scale::classifier_scale();
    eprintln!("measuring the XDP fast path next to the classifier...");
    let xdp = crate::xdp::measure();
    report(&shared, &apart, &Others { scale, xdp }, json);
}

/// What one layout measured: per path, both modes; per path, the download (MB/s, A's CPU ms
/// per GB).
struct Measured {
    f: Vec<[Figures; 2]>,
    bulk: Vec<(f64, f64)>,
}

impl Bench {
    fn measure(&mut self, layout: Layout) -> Measured {
        self.set_layout(layout);
        let bench = self;
        eprintln!("layout {layout:?}:");
        let mut samples: Vec<[Vec<Sample>; 2]> = vec![[Vec::new(), Vec::new()]; WAYS.len()];
        for round in 0..ROUNDS {
            for mode in [false, true] {
                for k in 0..WAYS.len() {
                    // Rotate which path goes first.
                    let i = (k + round) % WAYS.len();
                    let s = bench.wrk(WAYS[i], mode);
                    eprintln!(
                        "  round {round} {:<10} {:<9} {:>9.0} req/s p50 {:.3} ms p99 {:.3} ms, A {:.1} ms CPU per 1k, {} errors",
                        WAYS[i].name(),
                        if mode { "new conn" } else { "keepalive" },
                        s.rps,
                        s.p50_ms,
                        s.p99_ms,
                        s.a_cpu_ms,
                        s.errors
                    );
                    samples[i][usize::from(mode)].push(s);
                }
            }
        }
        let mut bulk: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); WAYS.len()];
        for round in 0..ROUNDS {
            for k in 0..WAYS.len() {
                let i = (k + round) % WAYS.len();
                let (mbs, cpu) = bench.bulk(WAYS[i]);
                eprintln!("  round {round} {:<10} bulk {mbs:.0} MB/s, A {cpu:.0} ms CPU per GB", WAYS[i].name());
                bulk[i].0.push(mbs);
                bulk[i].1.push(cpu);
            }
        }
        let f: Vec<[Figures; 2]> = samples.iter().map(|m| [Figures::of(&m[0]), Figures::of(&m[1])]).collect();
        let bulk: Vec<(f64, f64)> = bulk.into_iter().map(|(m, c)| (median(m), median(c))).collect();
        Measured { f, bulk }
    }
}

/// What the other benchmarks measured in this run.
struct Others {
    scale: crate::scale::Scale,
    xdp: crate::xdp::XdpFigures,
}

fn report(shared: &Measured, apart: &Measured, o: &Others, json: bool) {
    let (d, r, p) = (0, 1, 2);
    // Rates, latencies and speeds with the work where the kernel puts it; A's CPU with A apart.
    let f: Vec<[Figures; 2]> = shared.f.iter().zip(&apart.f).map(|(s, a)| [0, 1].map(|m| Figures { a_cpu_ms: a[m].a_cpu_ms, ..s[m] })).collect();
    let bulk: Vec<(f64, f64)> = shared.bulk.iter().zip(&apart.bulk).map(|(s, a)| (s.0, a.1)).collect();
    println!("Redirector next to direct connections and HAProxy (TCP mode), one run, medians of {ROUNDS} rounds of {} s, wrk -t1 -c{CONNS}:", ROUND.as_secs());
    println!("Rates and latencies: the kernel places the work. A's CPU: with A on a CPU of its own (RPS and pinning), busy time incl. softirq, ms per 1,000 requests.");
    for (m, mode) in ["keep-alive", "new connection per request"].iter().enumerate() {
        println!("  {mode}:");
        println!("    {:<11} {:>10} {:>8} {:>9} {:>9} {:>12} {:>10} {:>9} {:>7}", "path", "req/s", "vs dir", "vs proxy", "p50 ms", "p99 ms", "A CPU/1k", "vs proxy", "errors");
        for (i, way) in WAYS.iter().enumerate() {
            let x = f[i][m];
            println!(
                "    {:<11} {:>10.0} {:>7.2}x {:>8.2}x {:>9.3} {:>12.3} {:>10.1} {:>8.2}x {:>7}",
                way.name(),
                x.rps,
                x.rps / f[d][m].rps,
                x.rps / f[p][m].rps,
                x.p50_ms,
                x.p99_ms,
                x.a_cpu_ms,
                x.a_cpu_ms / f[p][m].a_cpu_ms,
                x.errors
            );
        }
    }
    println!("  bulk download ({} MiB, one connection):", BULK >> 20);
    println!("    {:<11} {:>10} {:>8} {:>9} {:>12}", "path", "MB/s", "vs dir", "vs proxy", "A CPU ms/GB");
    for (i, way) in WAYS.iter().enumerate() {
        println!("    {:<11} {:>10.0} {:>7.2}x {:>8.2}x {:>12.0}", way.name(), bulk[i].0, bulk[i].0 / bulk[d].0, bulk[i].0 / bulk[p].0, bulk[i].1);
    }
    let a = &apart.f;
    println!("  with A on a CPU of its own (where A's CPU was counted; every packet through A crosses between the CPUs twice):");
    println!("    {:<11} {:>14} {:>8} {:>9} {:>14} {:>8} {:>9} {:>10}", "path", "keep-alive/s", "vs dir", "vs proxy", "new conn/s", "vs dir", "vs proxy", "bulk MB/s");
    for (i, way) in WAYS.iter().enumerate() {
        println!(
            "    {:<11} {:>14.0} {:>7.2}x {:>8.2}x {:>14.0} {:>7.2}x {:>8.2}x {:>10.0}",
            way.name(),
            a[i][0].rps,
            a[i][0].rps / a[d][0].rps,
            a[i][0].rps / a[p][0].rps,
            a[i][1].rps,
            a[i][1].rps / a[d][1].rps,
            a[i][1].rps / a[p][1].rps,
            apart.bulk[i].0
        );
    }
    // The direct path never touches A: CPU 1's time in its rows is someone else's.
    if (0..2).any(|m| f[d][m].a_cpu_ms > 0.1 * f[p][m].a_cpu_ms) {
        eprintln!(
            "warning: CPU {A_CPU} was busy during the direct rounds too ({:.1} and {:.1} ms per 1,000 requests): something else ran there, and A's CPU figures include it; run on a quiet machine",
            f[d][0].a_cpu_ms, f[d][1].a_cpu_ms
        );
    }
    // The headlines take the worse of the two modes.
    let rps_vs_direct = (f[r][0].rps / f[d][0].rps).min(f[r][1].rps / f[d][1].rps);
    let rps_vs_proxy = (f[r][0].rps / f[p][0].rps).min(f[r][1].rps / f[p][1].rps);
    let cpu_vs_proxy = (f[r][0].a_cpu_ms / f[p][0].a_cpu_ms).max(f[r][1].a_cpu_ms / f[p][1].a_cpu_ms);
    let bulk_vs_direct = bulk[r].0 / bulk[d].0;
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "Goals (worse mode): redirector >= 0.9x direct: {rps_vs_direct:.2}x {}; >= 2x proxy: {rps_vs_proxy:.2}x {}; A's CPU <= 0.2x proxy's: {cpu_vs_proxy:.2}x {}",
        verdict(rps_vs_direct >= 0.9),
        verdict(rps_vs_proxy >= 2.0),
        verdict(cpu_vs_proxy <= 0.2)
    );
    let (scale_case, scale_growth) = o.scale.worst_growth(false);
    let (_, scale_hot) = o.scale.worst_growth(true);
    println!(
        "Classifier at scale (bench scale): {} to {} migrated clients, worst case {scale_case:?} {scale_growth:.2}x over different packets, {scale_hot:.2}x one packet again and again (goal <= 1.2x); existing flow {:.2}x an empty program (goal <= 3x)",
        crate::scale::SIZES[0],
        crate::scale::SIZES[crate::scale::SIZES.len() - 1],
        o.scale.existing_vs_empty()
    );
    println!(
        "XDP fast path (bench xdp): {:.0} forwarded packets/s per core of A against {:.0} with the classifier alone: {:.2}x (goal >= 2x)",
        o.xdp.xdp_pps, o.xdp.tc_pps, o.xdp.xdp_vs_tc_pps
    );
    let png = plot_path();
    let groups: Vec<&str> = WAYS.iter().map(|w| w.name()).collect();
    let series = |pick: fn(&Figures) -> f64| vec![("keep-alive", f.iter().map(|x| pick(&x[0])).collect()), ("new connection", f.iter().map(|x| pick(&x[1])).collect())];
    let panels = [
        crate::plot::Panel { title: "requests/s (higher is better)", series: series(|x| x.rps) },
        crate::plot::Panel { title: "p99 latency, ms (lower is better)", series: series(|x| x.p99_ms) },
        crate::plot::Panel { title: "A's CPU ms per 1,000 requests", series: series(|x| x.a_cpu_ms) },
    ];
    match crate::plot::grouped_bars(&png, &groups, &panels) {
        Ok(()) => println!("Plot: {}", png.display()),
        Err(e) => eprintln!("warning: no plot: {e}"),
    }
    if json {
        let mut m = serde_json::Map::new();
        m.insert("rps_vs_direct".into(), rps_vs_direct.into());
        m.insert("rps_vs_proxy".into(), rps_vs_proxy.into());
        m.insert("cpu_vs_proxy".into(), cpu_vs_proxy.into());
        m.insert("bulk_vs_direct".into(), bulk_vs_direct.into());
        m.insert("scale_1m_vs_10".into(), scale_growth.into());
        m.insert("scale_1m_vs_10_hot".into(), scale_hot.into());
        m.insert("existing_vs_empty".into(), o.scale.existing_vs_empty().into());
        m.insert("bytes_per_client".into(), o.scale.bytes_per_client().into());
        m.insert("xdp_vs_tc_pps".into(), o.xdp.xdp_vs_tc_pps.into());
        m.insert("xdp_pps".into(), o.xdp.xdp_pps.into());
        m.insert("tc_pps".into(), o.xdp.tc_pps.into());
        for (i, way) in WAYS.iter().enumerate() {
            for (k, mode) in ["keepalive", "new"].iter().enumerate() {
                let x = f[i][k];
                let w = way.name();
                m.insert(format!("{w}_{mode}_rps"), x.rps.into());
                m.insert(format!("{w}_{mode}_p50_ms"), x.p50_ms.into());
                m.insert(format!("{w}_{mode}_p99_ms"), x.p99_ms.into());
                m.insert(format!("{w}_{mode}_a_cpu_ms_per_1k"), x.a_cpu_ms.into());
                m.insert(format!("{w}_{mode}_errors"), x.errors.into());
            }
            m.insert(format!("{}_bulk_mbs", way.name()), bulk[i].0.into());
            m.insert(format!("{}_bulk_a_cpu_ms_per_gb", way.name()), bulk[i].1.into());
            for (k, mode) in ["keepalive", "new"].iter().enumerate() {
                m.insert(format!("{}_{mode}_rps_a_apart", way.name()), a[i][k].rps.into());
            }
            m.insert(format!("{}_bulk_mbs_a_apart", way.name()), apart.bulk[i].0.into());
        }
        m.insert("plot".into(), png.to_string_lossy().into_owned().into());
        println!("{}", serde_json::Value::Object(m));
    }
}

/// Where the plot goes: `target/bench/compare.png` next to the benchmark's binary.
fn plot_path() -> PathBuf {
    let bin = redirector_tests::agents::sibling_bin("redirector-bench");
    let target = bin.parent().and_then(Path::parent).map_or_else(std::env::temp_dir, Path::to_path_buf);
    let dir = target.join("bench");
    let _ = fs::create_dir_all(&dir);
    dir.join("compare.png")
}
