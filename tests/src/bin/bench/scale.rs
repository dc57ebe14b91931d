//! `cargo xtask bench scale [--json]`: the classifier's cost per packet with 10, 10,000 and
//! 1,000,000 migrated clients of each family, the kernel memory each migrated client takes,
//! and the origin agent's CPU and memory with 100,000 clients out ([`crate::agent_load`]).
//!
//! Each case runs `BPF_PROG_TEST_RUN` (the kernel's own run-time accounting, as `bench
//! datapath`) over [`DISTINCT`] different packets in turn, so that lookups spread over the
//! tables as many clients' flows do, instead of finding one hot entry in the cache: packets of
//! clients with no rule (their addresses share the host slots of migrated ones once there are
//! many), the first packet (SYN) and a later one (ACK, the socket lookup) of migrated clients'
//! flows, and packets of clients migrated by a prefix rule.
//!
//! Client addresses are spread over the address space (an odd multiplier, a bijection), as
//! real clients' are, not consecutive. A million IPv4 addresses do not fit in 198.18.0.0/15,
//! so the IPv4 rules use 240.0.0.0/4 (reserved, never routed); no packet is sent anywhere:
//! test runs only, in a namespace of the benchmark's own with nothing but `lo`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener},
    time::Instant,
};

use redirector::datapath::{Datapath, Location, Prefix};
use redirector_common::{maps, programs};
use redirector_tests::{
    net::{SERVICE4, SERVICE6, sh},
    packets::{Ip, Pkt},
};

/// Migrated clients of each family, cumulative.
pub const SIZES: [u32; 3] = [10, 10_000, 1_000_000];
/// Different packets each case cycles through.
const DISTINCT: u32 = 4096;
/// Rounds per case; each runs every packet [`PASSES`] times.
const ROUNDS: usize = 5;
const PASSES: u32 = 4;
/// Prefix rules (IPv4 /24, IPv6 /64) next to every size's host rules.
const PREFIXES: u32 = 16;

const TARGET4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const TARGET6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// The `i`-th IPv4 client: 240.0.0.0/5, spread by an odd multiplier (distinct for distinct `i`).
fn client4(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xf000_0000 | (i.wrapping_mul(0x9e37_79b1) & 0x07ff_ffff))
}

/// The `i`-th IPv6 client: 2001:db8::/64, spread the same way.
fn client6(i: u32) -> Ipv6Addr {
    let id = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    Ipv6Addr::from((u128::from(0x2001_0db8u32) << 96) | u128::from(id))
}

/// Prefix rule `j`: 248.j.0.0/24 style (IPv4, 248.0.0.0/5) and 2001:db8:1:j::/64.
fn prefix4(j: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xf800_0000 | (j << 8))
}

fn prefix6(j: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, u16::try_from(j).expect("few prefixes"), 0, 0, 0, 0)
}

fn tcp(src: IpAddr, sport: u16, flags: u8) -> Vec<u8> {
    let (ip, mss) = match src {
        IpAddr::V4(s) => (Ip::V4(s, SERVICE4), 1460),
        IpAddr::V6(s) => (Ip::V6(s, SERVICE6), 1440),
    };
    let p = Pkt::tcp(ip, sport, 80, flags);
    if flags & 0x02 != 0 { p.mss(mss).build() } else { p.build() }
}

/// One case: a name, the program, its packets, and the counter each packet must move.
struct Case {
    name: &'static str,
    prog: &'static str,
    packets: Vec<Vec<u8>>,
    counter: Option<&'static str>,
}

/// The cases at `n` migrated clients of each family.
fn cases(n: u32) -> Vec<Case> {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    let k = DISTINCT;
    let sport = |j: u32| 10_000 + u16::try_from(j % 50_000).expect("port");
    // Migrated clients spread over the whole set; clients with no rule are the next indexes
    // of the same bijection (so at a million they share slots with migrated ones).
    let migrated = |j: u32| u64::from(j) * u64::from(n) / u64::from(k);
    let m = |j: u32| u32::try_from(migrated(j)).expect("index");
    let set = |f: &dyn Fn(u32) -> Vec<u8>| (0..k).map(f).collect::<Vec<_>>();
    vec![
        Case { name: "empty program", prog: programs::EMPTY, packets: set(&|j| tcp(IpAddr::V4(client4(n + j)), sport(j), SYN)), counter: None },
        Case { name: "v4 no rule", prog: programs::INGRESS, packets: set(&|j| tcp(IpAddr::V4(client4(n + j)), sport(j), SYN)), counter: Some("passed-not-migrated") },
        Case { name: "v4 steered SYN", prog: programs::INGRESS, packets: set(&|j| tcp(IpAddr::V4(client4(m(j))), sport(j), SYN)), counter: Some("forwarded-new") },
        Case { name: "v4 steered ACK", prog: programs::INGRESS, packets: set(&|j| tcp(IpAddr::V4(client4(m(j))), sport(j), ACK)), counter: Some("forwarded-existing") },
        Case {
            name: "v4 by prefix SYN",
            prog: programs::INGRESS,
            packets: set(&|j| tcp(IpAddr::V4(Ipv4Addr::from(u32::from(prefix4(j % PREFIXES)) | (j % 250 + 1))), sport(j), SYN)),
            counter: Some("forwarded-new"),
        },
        Case { name: "v6 no rule", prog: programs::INGRESS, packets: set(&|j| tcp(IpAddr::V6(client6(n + j)), sport(j), SYN)), counter: Some("passed-not-migrated") },
        Case { name: "v6 steered SYN", prog: programs::INGRESS, packets: set(&|j| tcp(IpAddr::V6(client6(m(j))), sport(j), SYN)), counter: Some("forwarded-new") },
        Case { name: "v6 steered ACK", prog: programs::INGRESS, packets: set(&|j| tcp(IpAddr::V6(client6(m(j))), sport(j), ACK)), counter: Some("forwarded-existing") },
    ]
}

#[derive(Clone, Copy)]
pub struct Cost {
    pub name: &'static str,
    pub spread: f64,
    pub hot: f64,
}

impl Cost {
    fn get(&self, hot: bool) -> f64 {
        if hot { self.hot } else { self.spread }
    }
}

/// What one size measured.
pub struct Size {
    pub n: u32,
    /// ns per packet, in the order of [`cases`]: over different packets, and over the first
    /// packet again and again (a cache that holds everything: the lookups' own work).
    pub ns: Vec<Cost>,
    /// Kernel memory of the rule maps, both families (bytes, as the kernel accounts it in
    /// `memlock`): single addresses' hash maps and prefixes' tries.
    pub rule_bytes: u64,
    /// Seconds to install this size's rules (both families).
    pub install_s: f64,
}

pub struct Scale {
    pub sizes: Vec<Size>,
    /// The host slot tables of both families, bytes (fixed).
    pub slot_bytes: u64,
    /// The rule maps before any rule, bytes (their fixed part: the hash maps' buckets).
    pub empty_rule_bytes: u64,
}

impl Scale {
    /// Kernel memory per migrated client (the rule maps' growth from the smallest to the
    /// largest size, per rule).
    pub fn bytes_per_client(&self) -> f64 {
        let (first, last) = (&self.sizes[0], &self.sizes[self.sizes.len() - 1]);
        #[expect(clippy::cast_precision_loss, reason = "sizes are small")]
        let per = (last.rule_bytes - first.rule_bytes) as f64 / (2.0 * f64::from(last.n - first.n));
        per
    }

    /// The costliest case's growth from the smallest to the largest size (per case: cost at
    /// the largest over cost at the smallest, each against the empty program of its run).
    pub fn worst_growth(&self, hot: bool) -> (&'static str, f64) {
        let (first, last) = (&self.sizes[0], &self.sizes[self.sizes.len() - 1]);
        let rel = |s: &Size, i: usize| s.ns[i].get(hot) / s.ns[0].get(hot);
        (1..first.ns.len()).map(|i| (first.ns[i].name, rel(last, i) / rel(first, i))).max_by(|a, b| a.1.total_cmp(&b.1)).expect("cases")
    }

    /// A migrated client's existing flow (IPv4 ACK) against the empty program, at the smallest
    /// size, one packet again and again (as `bench datapath` measures it).
    pub fn existing_vs_empty(&self) -> f64 {
        let s = &self.sizes[0];
        let i = s.ns.iter().position(|c| c.name == "v4 steered ACK").expect("case");
        s.ns[i].hot / s.ns[0].hot
    }
}

/// `memlock` of the map pinned at `pin`, from its fdinfo.
fn map_memory(pin: &std::path::Path) -> u64 {
    let map = aya::maps::MapData::from_pin(pin).unwrap_or_else(|e| panic!("opening {}: {e}", pin.display()));
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
    info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no memlock in the fdinfo of {}", pin.display()))
}

/// `case`'s cost per packet over its packets in turn, or (`hot`) over its first one only.
fn measure(dp: &mut Datapath, case: &Case, hot: bool) -> f64 {
    if let Some(counter) = case.counter {
        let before = dp.stats().expect("stats").get(counter);
        dp.test_run(case.prog, &case.packets[0], 1).expect("test run");
        assert_eq!(dp.stats().expect("stats").get(counter), before + 1, "case {:?} must be decided as {counter}", case.name);
    }
    let mut samples = Vec::new();
    for _ in 0..ROUNDS {
        let (t0, n0) = dp.run_stats(case.prog).expect("stats");
        for _ in 0..PASSES {
            for p in &case.packets {
                dp.test_run(case.prog, if hot { &case.packets[0] } else { p }, 1).expect("test run");
            }
        }
        let (t1, n1) = dp.run_stats(case.prog).expect("stats");
        #[expect(clippy::cast_precision_loss, reason = "ns and counts are small")]
        samples.push((t1 - t0) as f64 / (n1 - n0) as f64);
    }
    crate::median(samples)
}

/// Measures every size, in a network namespace of its own.
pub fn classifier_scale() -> Scale {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        sh(&["ip", "link", "set", "lo", "up"]);
        sh(&["ip", "addr", "add", &format!("{SERVICE4}/32"), "dev", "lo"]);
        sh(&["ip", "-6", "addr", "add", &format!("{SERVICE6}/128"), "dev", "lo", "nodad"]);
        let _listener = TcpListener::bind((SERVICE4, 80)).expect("listener");
        let _listener6 = TcpListener::bind((SERVICE6, 80)).expect("listener v6");
        let dir = std::env::temp_dir().join(format!("redirector-bench-scale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bpffs dir");
        sh(&["mount", "-t", "bpf", "bpf", &dir.to_string_lossy()]);
        let result = std::panic::catch_unwind(|| run(&dir));
        let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&dir);
        result.unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
    .join()
    .expect("classifier scale benchmark")
}

fn run(bpffs: &std::path::Path) -> Scale {
    let mut dp = Datapath::open(&Location { bpffs: bpffs.to_path_buf(), instance: "scale".into() }).expect("open");
    dp.add_service((IpAddr::V4(SERVICE4), 80), "lo", Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))), Some(1500)).expect("service");
    dp.add_service((IpAddr::V6(SERVICE6), 80), "lo", Some(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))), Some(1500)).expect("service v6");
    let prefixes4: Vec<Prefix> = (0..PREFIXES).map(|j| Prefix { addr: IpAddr::V4(prefix4(j)), len: 24 }).collect();
    let prefixes6: Vec<Prefix> = (0..PREFIXES).map(|j| Prefix { addr: IpAddr::V6(prefix6(j)), len: 64 }).collect();
    dp.migrate_many(&prefixes4, IpAddr::V4(TARGET4), None, false).expect("prefix rules");
    dp.migrate_many(&prefixes6, IpAddr::V6(TARGET6), None, false).expect("prefix rules v6");
    let rule_maps = || [maps::MIGRATED_V4, maps::MIGRATED_V6, maps::HOST_RULES_V4, maps::HOST_RULES_V6].iter().map(|m| map_memory(&dp_dir(bpffs).join(m))).sum::<u64>();
    let empty_rule_bytes = rule_maps();
    let slot_bytes = map_memory(&dp_dir(bpffs).join(maps::HOSTS_V4)) + map_memory(&dp_dir(bpffs).join(maps::HOSTS_V6));
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF run-time statistics");
    let mut sizes = Vec::new();
    let mut have = 0;
    for n in SIZES {
        let t0 = Instant::now();
        let v4: Vec<Prefix> = (have..n).map(|i| Prefix { addr: IpAddr::V4(client4(i)), len: 32 }).collect();
        dp.migrate_many(&v4, IpAddr::V4(TARGET4), None, false).expect("rules");
        drop(v4);
        let v6: Vec<Prefix> = (have..n).map(|i| Prefix { addr: IpAddr::V6(client6(i)), len: 128 }).collect();
        dp.migrate_many(&v6, IpAddr::V6(TARGET6), None, false).expect("rules v6");
        let install_s = t0.elapsed().as_secs_f64();
        have = n;
        eprintln!("  {n} clients of each family installed in {install_s:.1} s; measuring...");
        let ns = cases(n).iter().map(|c| Cost { name: c.name, spread: measure(&mut dp, c, false), hot: measure(&mut dp, c, true) }).collect();
        sizes.push(Size { n, ns, rule_bytes: rule_maps(), install_s });
    }
    Scale { sizes, slot_bytes, empty_rule_bytes }
}

fn dp_dir(bpffs: &std::path::Path) -> std::path::PathBuf {
    Location { bpffs: bpffs.to_path_buf(), instance: "scale".into() }.dir()
}

/// One table of costs: over different packets, or one packet again and again.
fn print_costs(s: &Scale, hot: bool) {
    let first = &s.sizes[0];
    let last = &s.sizes[s.sizes.len() - 1];
    print!("  {:<20}", "case");
    for size in &s.sizes {
        print!(" {:>14}", format!("{} ns", size.n));
    }
    println!(" {:>10}", "growth");
    for (i, c) in first.ns.iter().enumerate() {
        print!("  {:<20}", c.name);
        for size in &s.sizes {
            print!(" {:>8.1} {:>4.2}x", size.ns[i].get(hot), size.ns[i].get(hot) / size.ns[0].get(hot));
        }
        let rel = |s: &Size| s.ns[i].get(hot) / s.ns[0].get(hot);
        let growth = if i == 0 { last.ns[0].get(hot) / first.ns[0].get(hot) } else { rel(last) / rel(first) };
        println!(" {growth:>9.2}x");
    }
}

/// Prints the tables.
pub fn print(s: &Scale) {
    let first = &s.sizes[0];
    let last = &s.sizes[s.sizes.len() - 1];
    println!("Classifier cost per packet by migrated clients of each family (kernel run_time_ns/run_cnt, median of {ROUNDS} rounds),");
    println!("{DISTINCT} different packets per case in turn (lookups spread over the tables, as many clients' are):");
    print_costs(s, false);
    println!("the first packet of each case again and again (everything it touches stays in the CPU's caches):");
    print_costs(s, true);
    println!("  (each cost also as a ratio to the empty program of its size; growth: that ratio at {} over at {})", last.n, first.n);
    for size in &s.sizes {
        println!("  {:>9} clients: rule maps {:>7.1} MiB, installed in {:.1} s", size.n, mib(size.rule_bytes), size.install_s);
    }
    let (case, growth) = s.worst_growth(false);
    let (hot_case, hot_growth) = s.worst_growth(true);
    println!(
        "Kernel memory per migrated client: {:.0} bytes (the rule maps' growth per rule); fixed: host slot tables {:.1} MiB, empty rule maps {:.1} MiB. Goal: at most 1.2x from {} to {}: worst case {case:?} {growth:.2}x {} (one packet again and again: {hot_case:?} {hot_growth:.2}x)",
        s.bytes_per_client(),
        mib(s.slot_bytes),
        mib(s.empty_rule_bytes),
        first.n,
        last.n,
        if growth <= 1.2 { "met" } else { "MISSED" }
    );
}

#[expect(clippy::cast_precision_loss, reason = "sizes are small")]
fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
}

pub fn scale(json: bool) {
    eprintln!("measuring the classifier with {SIZES:?} migrated clients of each family...");
    let agent = crate::agent_load::measure();
    let s = classifier_scale();
    print(&s);
    crate::agent_load::print(&agent);
    if json {
        let mut m = serde_json::Map::new();
        m.insert("scale_1m_vs_10".into(), s.worst_growth(false).1.into());
        m.insert("scale_1m_vs_10_hot".into(), s.worst_growth(true).1.into());
        m.insert("existing_vs_empty".into(), s.existing_vs_empty().into());
        m.insert("bytes_per_client".into(), s.bytes_per_client().into());
        m.insert("agent_cpu_ms_per_s".into(), agent.cpu_ms_per_s[0].into());
        m.insert("agent_cpu_ms_per_s_100k".into(), agent.cpu_ms_per_s[1].into());
        m.insert("agent_rss_kib".into(), agent.rss_kib[0].into());
        m.insert("agent_rss_kib_100k".into(), agent.rss_kib[1].into());
        for size in &s.sizes {
            for c in &size.ns {
                let name = c.name.replace(' ', "_");
                m.insert(format!("ns_{}_{name}", size.n), c.spread.into());
                m.insert(format!("ns_hot_{}_{name}", size.n), c.hot.into());
            }
        }
        println!("{}", serde_json::Value::Object(m));
    }
}
