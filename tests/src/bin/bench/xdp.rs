//! `cargo xtask bench xdp [--json]`: the origin forwarding a migrated client's packets with the
//! TC classifier alone and with the XDP fast path in front of it, measured in the same run.
//!
//! Forwarded packets per second per core. A generator of the bench's own, in the client's
//! namespace, sends ACKs of flows that live on B (the common packet of a migrated client: socket
//! lookup on A, encapsulated, sent to B) from one migrated address to A's service, from a packet
//! socket with `PACKET_QDISC_BYPASS` and `sendmmsg` (batches of 64 prebuilt frames, 1,024 flows),
//! for `WINDOW` per round (bounded in frames too), rounds alternating TC and XDP. The switch
//! passes them on to A's veth as XDP frames (`redirector_xdp_bench_source`, `XDP_REDIRECT`), so
//! that A receives them without a socket buffer, as from a NIC's driver: the classifier's path
//! then makes one (and runs GRO and the stack's receive path up to TC), XDP does not. A's own
//! work is counted apart: its uplink receives in NAPI in both modes (GRO on), threaded
//! (`/sys/class/net/eth0/threaded`) and pinned to CPU 0, while the generator and everything
//! else on the way to A and from it (the client's veth, the switch, B) runs on CPU 1. So the CPU
//! time of A's NAPI threads (`/proc/PID/schedstat`) is what A spent receiving, deciding and
//! sending the packets on to the switch's queue, and the figure per core is A's forwarded
//! packets (its `forwarded-existing` counter, which both paths count; every XDP round checks
//! that `xdp-forwarded` moved as much) per second of that time. The busy time of CPU 1
//! (`/proc/stat`) gives the rest of the path's figure, printed next to it.
//!
//! Per-packet cost: `BPF_PROG_TEST_RUN`, the kernel's own `run_time_ns / run_cnt` with BPF
//! statistics on, one run per call (a forwarded packet is rewritten), as `bench datapath` does,
//! in a namespace of its own where A's uplink is a veth with a resolved next hop (so that XDP
//! really forwards: its `bpf_fib_lookup` is in its time, while the classifier's neighbour
//! resolution (`bpf_redirect_neigh`) runs after the program and is not).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use redirector::datapath::{Datapath, Location, Prefix};
use redirector_common::programs;
use redirector_tests::{
    Server, Topology, in_netns,
    net::{SERVICE4, client4, ethtool_set, sh, xdp_uplink_here},
    packets::{Ip, Pkt},
};

use crate::median;

/// Rounds of each mode, alternating.
const ROUNDS: usize = 3;
/// Length of one round of the generator.
const WINDOW: Duration = Duration::from_secs(2);
/// At most this many frames per round, whatever the machine.
const MAX_FRAMES: u64 = 20_000_000;
/// Calls per `BPF_PROG_TEST_RUN` case per round.
const RUNS: u32 = 20_000;
/// The CPU the generator (and the path to and from A) runs on.
const GEN_CPU: usize = 1;
/// The CPU A's NAPI threads run on.
const A_CPU: usize = 0;
/// `ETHTOOL_SGRO`.
const ETHTOOL_SGRO: u32 = 0x2c;
const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;
/// `XDP_TX`.
const XDP_TX: i32 = 3;

/// What `bench xdp` measured (also for `bench compare`).
#[derive(Clone, Debug)]
pub struct XdpFigures {
    /// Forwarded packets per second of A's own CPU time (its NAPI threads), classifier alone.
    pub tc_pps: f64,
    /// The same with the XDP fast path.
    pub xdp_pps: f64,
    /// `xdp_pps / tc_pps`.
    pub xdp_vs_tc_pps: f64,
    /// Forwarded packets per second of the generator's CPU's busy time (the whole path but A).
    pub tc_path_pps: f64,
    pub xdp_path_pps: f64,
    /// Forwarded packets per second of wall-clock time (the generator's CPU saturated or not).
    pub tc_rate: f64,
    pub xdp_rate: f64,
    /// Frames the generator sent per second, per mode (what was offered).
    pub tc_sent: f64,
    pub xdp_sent: f64,
    /// Share of the generator's CPU that was busy, per mode.
    pub tc_busy: f64,
    pub xdp_busy: f64,
    /// `BPF_PROG_TEST_RUN` ns per packet of a migrated client's existing flow (forwarded).
    pub tc_ns: f64,
    pub xdp_ns: f64,
    /// The same for a steered SYN (MSS lowered, forwarded).
    pub tc_syn_ns: f64,
    pub xdp_syn_ns: f64,
    /// XDP's cost on a packet it passes to the classifier (a client with no rule).
    pub xdp_pass_ns: f64,
    /// Empty programs of each kind, the measurement's own floor.
    pub tc_empty_ns: f64,
    pub xdp_empty_ns: f64,
}

/// Measures everything `bench xdp` prints (needs root; about half a minute).
#[must_use]
pub fn measure() -> XdpFigures {
    eprintln!("measuring per-packet cost with BPF_PROG_TEST_RUN ({ROUNDS} rounds x {RUNS} runs per case)...");
    let c = costs();
    eprintln!("measuring forwarded packets per second, TC and XDP alternating ({ROUNDS} rounds of {} s each)...", WINDOW.as_secs());
    let r = rates();
    let per_core = |v: &[Round]| median(v.iter().map(|r| r.forwarded as f64 / r.a_secs.max(1e-6)).collect());
    let per_path_core = |v: &[Round]| median(v.iter().map(|r| r.forwarded as f64 / r.busy_secs.max(1e-3)).collect());
    let rate = |v: &[Round]| median(v.iter().map(|r| r.forwarded as f64 / r.secs).collect());
    let busy = |v: &[Round]| median(v.iter().map(|r| r.busy_secs / r.secs).collect());
    let sent = |v: &[Round]| median(v.iter().map(|r| r.sent as f64 / r.secs).collect());
    let (tc_pps, xdp_pps) = (per_core(&r.tc), per_core(&r.xdp));
    XdpFigures {
        tc_pps,
        xdp_pps,
        xdp_vs_tc_pps: xdp_pps / tc_pps,
        tc_path_pps: per_path_core(&r.tc),
        xdp_path_pps: per_path_core(&r.xdp),
        tc_rate: rate(&r.tc),
        xdp_rate: rate(&r.xdp),
        tc_sent: sent(&r.tc),
        xdp_sent: sent(&r.xdp),
        tc_busy: busy(&r.tc),
        xdp_busy: busy(&r.xdp),
        tc_ns: c[case::TC_ACK],
        xdp_ns: c[case::XDP_ACK],
        tc_syn_ns: c[case::TC_SYN],
        xdp_syn_ns: c[case::XDP_SYN],
        xdp_pass_ns: c[case::XDP_PASS],
        tc_empty_ns: c[case::TC_EMPTY],
        xdp_empty_ns: c[case::XDP_EMPTY],
    }
}

/// `cargo xtask bench xdp [--json]`.
pub fn xdp(json: bool) {
    let f = measure();
    println!("XDP fast path vs the TC classifier, forwarding a migrated client's packets (same run):");
    println!("  {:<46} {:>12} {:>12} {:>8}", "", "TC", "XDP", "XDP/TC");
    println!("  {:<46} {:>12.0} {:>12.0} {:>7.2}x", "forwarded packets/s per core of A (NAPI threads)", f.tc_pps, f.xdp_pps, f.xdp_vs_tc_pps);
    println!("  {:<46} {:>12.1} {:>12.1} {:>7.2}x", "A's CPU ns per forwarded packet", 1e9 / f.tc_pps, 1e9 / f.xdp_pps, f.tc_pps / f.xdp_pps);
    println!("  {:<46} {:>12.0} {:>12.0} {:>7.2}x", "forwarded packets/s per busy core, rest of path", f.tc_path_pps, f.xdp_path_pps, f.xdp_path_pps / f.tc_path_pps);
    println!("  {:<46} {:>12.0} {:>12.0} {:>7.2}x", "forwarded packets/s (wall clock)", f.tc_rate, f.xdp_rate, f.xdp_rate / f.tc_rate);
    println!("  {:<46} {:>12.0} {:>12.0}", "frames sent/s by the generator", f.tc_sent, f.xdp_sent);
    println!("  {:<46} {:>11.0}% {:>11.0}%", "generator's CPU busy (the rest of the path)", f.tc_busy * 100.0, f.xdp_busy * 100.0);
    println!("  {:<46} {:>12.1} {:>12.1} {:>7.2}x", "ns/packet, existing flow (BPF_PROG_TEST_RUN)", f.tc_ns, f.xdp_ns, f.xdp_ns / f.tc_ns);
    println!("  {:<46} {:>12.1} {:>12.1} {:>7.2}x", "ns/packet, new connection (SYN, MSS lowered)", f.tc_syn_ns, f.xdp_syn_ns, f.xdp_syn_ns / f.tc_syn_ns);
    println!("  {:<46} {:>12.1} {:>12.1}", "ns/packet, empty program", f.tc_empty_ns, f.xdp_empty_ns);
    println!("  {:<46} {:>12} {:>12.1}", "ns/packet XDP passes on (client with no rule)", "", f.xdp_pass_ns);
    let met = f.xdp_vs_tc_pps >= 2.0;
    println!("Goal: XDP forwards at least 2x the packets per second of TC per core: {:.2}x, {}", f.xdp_vs_tc_pps, if met { "met" } else { "MISSED" });
    if json {
        println!(
            "{}",
            serde_json::json!({
                "xdp_vs_tc_pps": f.xdp_vs_tc_pps,
                "xdp_pps": f.xdp_pps,
                "tc_pps": f.tc_pps,
                "xdp_ns": f.xdp_ns,
                "tc_ns": f.tc_ns,
                "xdp_rate": f.xdp_rate,
                "tc_rate": f.tc_rate,
                "xdp_path_pps": f.xdp_path_pps,
                "tc_path_pps": f.tc_path_pps,
                "xdp_sent": f.xdp_sent,
                "tc_sent": f.tc_sent,
                "xdp_syn_ns": f.xdp_syn_ns,
                "tc_syn_ns": f.tc_syn_ns,
                "xdp_pass_ns": f.xdp_pass_ns,
                "xdp_empty_ns": f.xdp_empty_ns,
                "tc_empty_ns": f.tc_empty_ns,
                "goal_met": met,
            })
        );
    }
}

/// Indexes of the cases in [`costs`]'s result.
mod case {
    pub const TC_EMPTY: usize = 0;
    pub const XDP_EMPTY: usize = 1;
    pub const TC_ACK: usize = 2;
    pub const XDP_ACK: usize = 3;
    pub const TC_SYN: usize = 4;
    pub const XDP_SYN: usize = 5;
    pub const XDP_PASS: usize = 6;
}

/// Per-packet cost of each case (ns, medians), in a namespace of its own
/// ([`xdp_uplink_here`]), the service listening.
fn costs() -> Vec<f64> {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        let ifindex = xdp_uplink_here();
        let _listener = TcpListener::bind((SERVICE4, 80)).expect("listener");
        let dir = std::env::temp_dir().join(format!("redirector-bench-xdp-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("bpffs dir");
        sh(&["mount", "-t", "bpf", "bpf", &dir.to_string_lossy()]);
        let result = std::panic::catch_unwind(|| {
            let mut dp = Datapath::open(&Location { bpffs: dir.clone(), instance: "bench".into() }).expect("open");
            let s = dp.add_service_xdp((IpAddr::V4(SERVICE4), 80), "v0", Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))), Some(1500), true).expect("service");
            assert!(s.xdp, "the fast path is on: {:?}", s.xdp_unavailable);
            dp.migrate(Prefix { addr: IpAddr::V4(client4(5)), len: 32 }, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), None).expect("rule");
            let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF run-time statistics");
            let pkt = |src: Ipv4Addr, flags: u8| {
                let p = Pkt::tcp(Ip::V4(src, SERVICE4), 40_000, 80, flags);
                if flags & TCP_SYN != 0 { p.mss(1460).build() } else { p.build() }
            };
            let (ack, syn, other) = (pkt(client4(5), TCP_ACK), pkt(client4(5), TCP_SYN), pkt(client4(6), TCP_ACK));
            // (program, packet, XDP, the counter that must move)
            let cases: [(&str, &[u8], bool, Option<&str>); 7] = [
                (programs::EMPTY, &ack, false, None),
                (programs::XDP_EMPTY, &ack, true, None),
                (programs::INGRESS, &ack, false, Some("forwarded-existing")),
                (programs::XDP, &ack, true, Some("xdp-forwarded")),
                (programs::INGRESS, &syn, false, Some("forwarded-new")),
                (programs::XDP, &syn, true, Some("xdp-forwarded")),
                (programs::XDP, &other, true, Some("xdp-passed")),
            ];
            let run = |dp: &mut Datapath, (prog, p, xdp, _): (&str, &[u8], bool, Option<&str>)| {
                if xdp { dp.test_run_xdp(prog, p, 1, ifindex) } else { dp.test_run(prog, p, 1) }.expect("test run")
            };
            for (i, c) in cases.iter().enumerate() {
                let before = dp.stats().expect("stats");
                let r = run(&mut dp, *c);
                let after = dp.stats().expect("stats");
                if let Some(counter) = c.3 {
                    assert_eq!(after.get(counter), before.get(counter) + 1, "case {i} ({}) must be decided as {counter}", c.0);
                }
                if i == case::XDP_ACK || i == case::XDP_SYN {
                    assert_eq!(r.retval, XDP_TX, "case {i}: XDP forwards it itself");
                }
            }
            let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
            for _ in 0..ROUNDS {
                for (i, c) in cases.iter().enumerate() {
                    let (t0, n0) = dp.run_stats(c.0).expect("stats");
                    for _ in 0..RUNS {
                        run(&mut dp, *c);
                    }
                    let (t1, n1) = dp.run_stats(c.0).expect("stats");
                    #[expect(clippy::cast_precision_loss, reason = "ns and counts are small")]
                    samples[i].push((t1 - t0) as f64 / (n1 - n0) as f64);
                }
            }
            samples.into_iter().map(median).collect::<Vec<_>>()
        });
        let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&dir);
        match result {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
    .join()
    .expect("XDP cost benchmark")
}

/// One round of the generator.
struct Round {
    sent: u64,
    forwarded: u64,
    secs: f64,
    /// Busy time of the generator's CPU.
    busy_secs: f64,
    /// CPU time of A's NAPI threads.
    a_secs: f64,
}

/// The kernel's NAPI threads (`napi/IFNAME-ID`) whose interface name is `ifname`.
fn napi_threads(ifname: &str) -> Vec<i32> {
    let prefix = format!("napi/{ifname}-");
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim_end().starts_with(&prefix)) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// Turns threaded NAPI on for `ifname` in namespace `ns` and pins its new NAPI threads to
/// `cpu`; their pids.
fn threaded_napi(ns: &str, ifname: &str, cpu: usize) -> Vec<i32> {
    let before = napi_threads(ifname);
    // /sys/class/net shows the namespace sysfs was mounted in: `ip netns exec` mounts its own.
    sh(&["ip", "netns", "exec", ns, "sh", "-c", &format!("echo 1 > /sys/class/net/{ifname}/threaded")]);
    let threads: Vec<i32> = napi_threads(ifname).into_iter().filter(|p| !before.contains(p)).collect();
    assert!(!threads.is_empty(), "no NAPI thread of {ifname} in {ns} appeared");
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).expect("cpu set");
    for pid in &threads {
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(*pid), &set).unwrap_or_else(|e| panic!("pinning NAPI thread {pid}: {e}"));
    }
    threads
}

/// Attaches the bench's traffic source to the switch's end of the client's veth: every frame
/// the client sends goes on to A's veth as an XDP frame (`XDP_REDIRECT` to the switch's end of
/// A's veth), so A receives it without a socket buffer, as from a NIC's driver. Keep the guard.
fn source(t: &Topology) -> aya::Ebpf {
    let pins = t.bpffs.join("bench-source");
    fs::create_dir_all(&pins).expect("a folder for the source's maps");
    let (from, to) = (t.client.ns.clone(), t.a.ns.clone());
    in_netns(&t.switch, move || {
        use aya::programs::{Xdp, XdpMode};
        let to_index = redirector::datapath::interface_index(&to).expect("the switch's end of A's veth");
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&pins)
            .override_global(programs::XDP_BENCH_TO, &to_index, true)
            .load(redirector::datapath::EBPF_OBJECT)
            .expect("loading the eBPF object");
        let prog: &mut Xdp = ebpf.program_mut(programs::XDP_BENCH_SOURCE).expect("the source program").try_into().expect("an XDP program");
        prog.load().expect("loading the source program");
        prog.attach(&from, XdpMode::Driver).unwrap_or_else(|e| panic!("attaching the source to {from}: {e}"));
        ebpf
    })
}

/// CPU time of threads `pids` so far, in ns (`/proc/PID/schedstat`).
fn cpu_ns(pids: &[i32]) -> u64 {
    pids.iter().map(|p| fs::read_to_string(format!("/proc/{p}/schedstat")).ok().and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0)).sum()
}

struct Rates {
    tc: Vec<Round>,
    xdp: Vec<Round>,
}

fn mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (b, part) in m.iter_mut().zip(s.split(':')) {
        *b = u8::from_str_radix(part, 16).unwrap_or_else(|e| panic!("MAC {s}: {e}"));
    }
    m
}

/// Busy ticks (user, nice, system, irq, softirq, steal) of CPU `cpu`.
fn busy_jiffies(cpu: usize) -> u64 {
    let t = crate::cpu::CpuTicks::of(cpu);
    t.busy() + t.steal
}

fn rates() -> Rates {
    let t = Topology::new(1);
    let svc = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let _a = Server::start(&t.a.ns, "A", svc);
    let _peer = t.xdp_ready();
    let b = t.b.v4[0].to_string();
    // B's address resolved on A, so that both paths find the next hop from the first packet.
    t.a.ip(&["neigh", "replace", &b, "lladdr", &t.b.mac(), "dev", "eth0", "nud", "permanent"]);
    // A receives in NAPI in both modes, in threads on a CPU of their own; so does the switch's
    // end of A's veth (it runs XDP: see `Topology::xdp_ready`), on the generator's CPU. (That
    // XDP program also took TSO from A's veth, which is what lets veth hand A's packets to the
    // switch's NAPI rather than run the switch's work in A's thread.)
    ethtool_set(&t.a.ns, "eth0", ETHTOOL_SGRO, true);
    let a_threads = threaded_napi(&t.a.ns, "eth0", A_CPU);
    threaded_napi(&t.switch, &t.a.ns, GEN_CPU);
    // The client's frames reach A as XDP frames, as from a NIC (see `source`).
    let _source = source(&t);
    let service = svc.to_string();
    t.redirector_ok(&t.a, &["service", "add", &service, "--dev", "eth0"]);
    let client = client4(1);
    // B is not set up to take A's tunnel: it drops what it gets, which costs both modes alike.
    t.redirector_ok(&t.a, &["rule", "add", &client.to_string(), "--to", &b, "--no-probe"]);
    let (a_mac, k_mac) = (mac(&t.a.mac()), mac(&t.client.mac()));
    let frames: Vec<Vec<u8>> = (0..1024u16)
        .map(|i| {
            let mut f = Pkt::tcp(Ip::V4(client, SERVICE4), 10_000 + i, 80, TCP_ACK).seq(1).ack(1).build();
            f[0..6].copy_from_slice(&a_mac);
            f[6..12].copy_from_slice(&k_mac);
            f
        })
        .collect();
    let mut out = Rates { tc: Vec::new(), xdp: Vec::new() };
    for round in 0..2 * ROUNDS {
        let xdp = round % 2 == 1;
        let mut args = vec!["service", "add", &service, "--dev", "eth0"];
        if xdp {
            args.push("--xdp");
        }
        let said = t.redirector(&t.a, &args);
        assert!(said.status.success() && said.stderr.is_empty(), "service add {args:?}: {}", String::from_utf8_lossy(&said.stderr));
        let (f0, x0) = (t.counter(&t.a, "forwarded-existing"), t.counter(&t.a, "xdp-forwarded"));
        let frames = frames.clone();
        let a0 = cpu_ns(&a_threads);
        let (sent, secs, busy_secs) = in_netns(&t.client.ns, move || generate(&frames));
        #[expect(clippy::cast_precision_loss, reason = "ns of a few seconds")]
        let a_secs = (cpu_ns(&a_threads) - a0) as f64 / 1e9;
        let (f1, x1) = (t.counter(&t.a, "forwarded-existing"), t.counter(&t.a, "xdp-forwarded"));
        let forwarded = f1 - f0;
        if xdp {
            assert!(x1 - x0 >= forwarded * 9 / 10, "XDP forwarded them itself: {} of {forwarded}", x1 - x0);
        } else {
            assert_eq!(x1, x0, "nothing through XDP in a TC round");
        }
        let r = Round { sent, forwarded, secs, busy_secs, a_secs };
        if xdp { &mut out.xdp } else { &mut out.tc }.push(r);
    }
    out
}

/// Sends `frames` round and round out of this namespace's `eth0` for [`WINDOW`] (or
/// [`MAX_FRAMES`]) from a thread pinned to [`GEN_CPU`]: (frames sent, seconds, busy seconds of
/// that CPU).
fn generate(frames: &[Vec<u8>]) -> (u64, f64, f64) {
    let mut set = nix::sched::CpuSet::new();
    set.set(GEN_CPU).expect("cpu set");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pinning the generator");
    let ifindex = i32::try_from(redirector::datapath::interface_index("eth0").expect("eth0")).expect("ifindex");
    // SAFETY: a fresh packet socket, owned below; options and addresses are valid for it.
    let fd = unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd)
    };
    let one: libc::c_int = 1;
    // SAFETY: an int option on our socket.
    let rc = unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, (&raw const one).cast(), 4) };
    assert_eq!(rc, 0, "PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
    // SAFETY: sockaddr_ll is plain data.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET");
    to.sll_ifindex = ifindex;
    const BATCH: usize = 64;
    let mut iov: Vec<libc::iovec> = frames.iter().map(|f| libc::iovec { iov_base: f.as_ptr().cast_mut().cast(), iov_len: f.len() }).collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..frames.len())
        .map(|i| {
            // SAFETY: msghdr is plain data.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (&raw mut to).cast();
            h.msg_namelen = u32::try_from(size_of::<libc::sockaddr_ll>()).expect("size");
            h.msg_iov = &raw mut iov[i];
            h.msg_iovlen = 1;
            libc::mmsghdr { msg_hdr: h, msg_len: 0 }
        })
        .collect();
    let (start, busy0) = (Instant::now(), busy_jiffies(GEN_CPU));
    let (mut sent, mut at) = (0u64, 0usize);
    while start.elapsed() < WINDOW && sent < MAX_FRAMES {
        let n = BATCH.min(msgs.len() - at);
        // SAFETY: msgs[at..at + n] are valid headers pointing at frames that outlive the call.
        let rc = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs[at..].as_mut_ptr(), u32::try_from(n).expect("batch"), 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            assert!(e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EAGAIN), "sendmmsg: {e}");
            continue;
        }
        sent += u64::try_from(rc).unwrap_or(0);
        at = (at + usize::try_from(rc).unwrap_or(0)) % msgs.len();
    }
    let secs = start.elapsed().as_secs_f64();
    let busy = crate::cpu::ticks_ms(busy_jiffies(GEN_CPU) - busy0) / 1000.0;
    (sent, secs, busy)
}
