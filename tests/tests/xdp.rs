//! The origin's XDP fast path (`service add --xdp`) with real TCP in namespaces: it forwards
//! migrated clients' packets itself (its counter says so, and the classifier never sees them),
//! passes everything it cannot decide to the classifier, which still decides it right, and
//! leaves the interface when no service asks for it.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use redirector::datapath::{Datapath, Location};
use redirector_tests::{
    Client, Server, Topology, in_netns,
    net::{PassXdp, SERVICE4, SERVICE6, client4, client6},
    require_root,
};

fn svc4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(SERVICE4), port)
}

fn svc6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(SERVICE6), port)
}

type Servers = (Server, Server, Server, Server, PassXdp);

/// A and B serve port 80 of both families; A steers its service with `--xdp` on an uplink
/// ready for it. None when the test cannot run.
fn xdp_steered() -> Option<(Topology, Servers)> {
    if !require_root() {
        return None;
    }
    let t = Topology::new(8);
    let s = (
        Server::start(&t.a.ns, "A", svc4(80)),
        Server::start(&t.a.ns, "A", svc6(80)),
        Server::start(&t.b.ns, "B", SocketAddr::new(IpAddr::V4(t.b.v4[0]), 80)),
        Server::start(&t.b.ns, "B", SocketAddr::new(IpAddr::V6(t.b.v6[0]), 80)),
    );
    let s = (s.0, s.1, s.2, s.3, t.xdp_ready());
    t.steer_a_to_b_with(80, 80, &["--xdp"]);
    Some((t, s))
}

/// Whether an XDP program is attached to A's uplink (in driver mode: `ip` says `prog/xdp`).
fn xdp_on_a(t: &Topology) -> bool {
    t.a.ip(&["-d", "link", "show", "eth0"]).contains("prog/xdp")
}

#[test]
fn xdp_forwards_a_migrated_clients_new_connections_in_both_families() {
    let Some((t, _s)) = xdp_steered() else { return };
    assert!(xdp_on_a(&t), "service add --xdp attached XDP to A's uplink: {}", t.a.ip(&["-d", "link", "show", "eth0"]));
    let list = t.redirector_ok(&t.a, &["service", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).expect("service list JSON");
    assert!(v["services"].as_array().is_some_and(|l| l.len() == 2 && l.iter().all(|s| s["xdp"] == true)), "both services list the fast path: {list}");

    let (c4, c6) = (IpAddr::V4(client4(5)), IpAddr::V6(client6(5)));
    // Open before the rules: these flows live on A.
    let mut kept4 = Client::connect(&t.client.ns, c4, svc4(80));
    let mut kept6 = Client::connect(&t.client.ns, c6, svc6(80));
    assert_eq!((kept4.who(), kept6.who()), ("A".to_string(), "A".to_string()));
    t.migrate(&c4.to_string(), IpAddr::V4(t.b.v4[0]));
    t.migrate(&c6.to_string(), IpAddr::V6(t.b.v6[0]));

    let (fwd0, new0, passed0, local0) = (t.counter(&t.a, "xdp-forwarded"), t.counter(&t.a, "forwarded-new"), t.counter(&t.a, "xdp-passed"), t.counter(&t.a, "kept-local"));
    const N: u64 = 5;
    for (c, svc, b) in [(c4, svc4(80), IpAddr::V4(t.b.v4[0])), (c6, svc6(80), IpAddr::V6(t.b.v6[0]))] {
        for i in 0..N {
            let mut conn = Client::connect(&t.client.ns, c, svc);
            let (name, seen) = conn.try_who().expect("WHO after the rule");
            assert_eq!(name, "B", "new connection {i} of {c}: expected B, got {name} ({b} serves it)");
            assert_eq!(seen, c.to_string(), "B sees the client's own address");
            assert_eq!(conn.peer(), svc, "the client still talks to A's address");
            // More of the flow that lives on B: XDP forwards those too (forwarded-existing).
            assert_eq!(conn.who(), "B");
        }
    }
    for _ in 0..3 {
        assert_eq!(kept4.who(), "A", "an IPv4 flow living on A stays there (XDP passes it, the classifier keeps it)");
        assert_eq!(kept6.who(), "A", "the IPv6 one too");
    }
    let forwarded = t.counter(&t.a, "xdp-forwarded") - fwd0;
    let new = t.counter(&t.a, "forwarded-new") - new0;
    // Each connection: a SYN, the handshake's ACK, two requests (and the ACKs of the answers):
    // at least four packets forwarded per connection, all by XDP.
    assert!(new >= 2 * N, "every new connection's SYN was forwarded: {new}");
    assert!(forwarded >= 4 * 2 * N, "XDP forwarded the migrated client's packets itself: {forwarded} for {} connections", 2 * N);
    assert!(t.counter(&t.a, "xdp-passed") > passed0, "XDP passed the flows living on A");
    assert!(t.counter(&t.a, "kept-local") >= local0 + 6, "and the classifier kept them");
}

#[test]
fn what_xdp_cannot_decide_is_decided_by_the_classifier() {
    let Some((t, _s)) = xdp_steered() else { return };
    let c5 = IpAddr::V4(client4(5));
    t.migrate(&c5.to_string(), IpAddr::V4(t.b.v4[0]));
    let mut on_b = Client::connect(&t.client.ns, c5, svc4(80));
    assert_eq!(on_b.who(), "B");

    // A flow of the migrated client frozen on A (its connection moving live): XDP passes it,
    // the classifier drops it, so the request is not answered while it is frozen.
    let loc = Location { bpffs: t.bpffs.clone(), instance: t.a.ns.clone() };
    let flow = [(on_b.local(), svc4(80))];
    let mut dp = in_netns(&t.a.ns, move || Datapath::open(&loc).expect("A's datapath"));
    let (frozen0, fwd0) = (t.counter(&t.a, "dropped-frozen"), t.counter(&t.a, "xdp-forwarded"));
    dp.freeze(&flow, Duration::from_secs(30)).expect("freeze");
    on_b.set_read_timeout(Duration::from_millis(500)).expect("timeout");
    assert!(on_b.try_who().is_err(), "a frozen flow's request is not answered");
    assert!(t.counter(&t.a, "dropped-frozen") > frozen0, "the classifier dropped the frozen flow's packets");
    assert_eq!(t.counter(&t.a, "xdp-forwarded"), fwd0, "XDP forwarded none of them");
    // Thawed: the client's retransmission goes through, and XDP forwards again.
    dp.thaw(&flow).expect("thaw");
    on_b.set_read_timeout(Duration::from_secs(10)).expect("timeout");
    let (name, _) = on_b.try_who().expect("answered once thawed");
    assert_eq!(name, "B");
    assert!(t.counter(&t.a, "xdp-forwarded") > fwd0, "once thawed, XDP forwards the flow again");

    // A draining rule: new connections stay on A (XDP passes the SYN, the classifier keeps it).
    let draining0 = t.counter(&t.a, "kept-draining");
    t.redirector_ok(&t.a, &["rule", "del", &c5.to_string(), "--drain", "30"]);
    assert_eq!(Client::connect(&t.client.ns, c5, svc4(80)).who(), "A", "draining: a new connection stays on A");
    assert!(t.counter(&t.a, "kept-draining") > draining0);
    assert_eq!(on_b.who(), "B", "draining: the flow living on B still goes there");

    // Not migrated at all: A serves it, through the classifier.
    let mut other = Client::connect(&t.client.ns, IpAddr::V4(client4(6)), svc4(80));
    assert_eq!(other.who(), "A");
}

#[test]
fn the_fast_path_leaves_when_no_service_asks_for_it() {
    let Some((t, _s)) = xdp_steered() else { return };
    let (s4, s6) = (svc4(80).to_string(), svc6(80).to_string());
    let c5 = IpAddr::V4(client4(5));
    t.migrate(&c5.to_string(), IpAddr::V4(t.b.v4[0]));

    // Off for IPv4 only: still attached for the IPv6 service, and IPv4 goes through TC.
    t.redirector_ok(&t.a, &["service", "add", &s4, "--dev", "eth0"]);
    assert!(xdp_on_a(&t), "the IPv6 service still asks for XDP");
    let fwd0 = t.counter(&t.a, "xdp-forwarded");
    let new0 = t.counter(&t.a, "forwarded-new");
    assert_eq!(Client::connect(&t.client.ns, c5, svc4(80)).who(), "B", "the classifier alone steers the IPv4 service");
    assert_eq!(t.counter(&t.a, "xdp-forwarded"), fwd0, "XDP leaves a service without --xdp to the classifier");
    assert!(t.counter(&t.a, "forwarded-new") > new0);

    // Off for both: detached.
    t.redirector_ok(&t.a, &["service", "add", &s6, "--dev", "eth0"]);
    assert!(!xdp_on_a(&t), "no service asks for XDP: detached");
    assert_eq!(Client::connect(&t.client.ns, c5, svc4(80)).who(), "B", "steering goes on without XDP");

    // On again, then the services removed: detached.
    t.redirector_ok(&t.a, &["service", "add", &s4, "--dev", "eth0", "--xdp"]);
    assert!(xdp_on_a(&t));
    assert_eq!(Client::connect(&t.client.ns, c5, svc4(80)).who(), "B");
    assert!(t.counter(&t.a, "xdp-forwarded") > fwd0, "XDP forwards again");
    t.redirector_ok(&t.a, &["service", "del", &s4]);
    assert!(!xdp_on_a(&t), "the last service asking for XDP is gone: detached");
    t.redirector_ok(&t.a, &["service", "del", &s6]);
    assert!(!xdp_on_a(&t));
}

#[test]
fn an_interface_that_cannot_run_it_falls_back_to_the_classifier_with_a_warning() {
    if !require_root() {
        return;
    }
    let t = Topology::new(1);
    // Forwarding is off on a fresh namespace's eth0: bpf_fib_lookup would answer nothing.
    let out = t.redirector(&t.a, &["service", "add", &svc4(80).to_string(), "--dev", "eth0", "--xdp", "--json"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the service is steered all the same: {stderr}");
    assert!(stderr.contains("warning:") && stderr.contains("net.ipv4.conf.eth0.forwarding=1"), "the warning says what to set: {stderr}");
    assert!(stdout.contains("\"xdp\":false"), "{stdout}");
    assert!(!xdp_on_a(&t), "nothing attached");

    // Loopback has no native XDP (nor has a bridge, or most virtual devices).
    t.a.sysctl("net.ipv4.conf.lo.forwarding", "1");
    let out = t.redirector(&t.a, &["service", "add", "198.18.9.10:80", "--dev", "lo", "--tunnel-src", "198.18.0.1", "--xdp"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("native XDP on lo") && stderr.contains("TC classifier alone"), "the warning names the interface and the fallback: {stderr}");
    let list = t.redirector_ok(&t.a, &["service", "list", "--json"]);
    assert!(list.contains("\"xdp\":false") && !list.contains("\"xdp\":true"), "{list}");
    assert!(!t.a.ip(&["-d", "link", "show", "lo"]).contains("prog/xdp"));
}

/// `XDP_PASS` and `XDP_TX`; what the classifier returns for a packet it sends.
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;
const TC_ACT_REDIRECT: i32 = 7;

/// The counters of a decision, without XDP's own two.
fn decisions(before: &redirector::datapath::Stats, after: &redirector::datapath::Stats) -> Vec<(&'static str, u64)> {
    after.counters.iter().zip(&before.counters).filter(|((n, a), (_, b))| a != b && !n.starts_with("xdp-")).map(|((n, a), (_, b))| (*n, a - b)).collect()
}

/// The same crafted packets through the XDP program and through the classifier
/// (`BPF_PROG_TEST_RUN`, in a namespace of their own whose uplink `v0` is a veth with the
/// target's address resolved): XDP forwards exactly what the classifier forwards, with the
/// same counter and the same bytes from the outer IP header on; everything else it passes on
/// unchanged, for the classifier to decide.
#[test]
fn xdp_decides_as_the_classifier_or_passes() {
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};

    use redirector::datapath::Prefix;
    use redirector_common::programs;
    use redirector_tests::packets::{Ip, Pkt};
    if !require_root() {
        return;
    }
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        let ifindex = redirector_tests::net::xdp_uplink_here();
        redirector_tests::net::sh(&["ip", "addr", "add", "198.18.1.5/32", "dev", "lo"]);
        let (svc4, svc6) = (SERVICE4, SERVICE6);
        let listener = TcpListener::bind((svc4, 80)).expect("listener");
        let _listener6 = TcpListener::bind((svc6, 80)).expect("listener v6");
        // A flow of the migrated client that lives here.
        let local = redirector_tests::app::connect_here(IpAddr::V4(client4(5)), SocketAddr::new(IpAddr::V4(svc4), 80)).expect("a connection living here");
        let local_port = local.local_addr().expect("addr").port();
        let _accepted = listener.accept().expect("accept");
        let dir = std::env::temp_dir().join(format!("redirector-xdp-ct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bpffs dir");
        redirector_tests::net::sh(&["mount", "-t", "bpf", "bpf", &dir.to_string_lossy()]);
        let result = std::panic::catch_unwind(|| {
            let mut dp = Datapath::open(&Location { bpffs: dir.clone(), instance: "xct".into() }).expect("open");
            for (svc, ctl) in [(IpAddr::V4(svc4), IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))), (IpAddr::V6(svc6), IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)))] {
                let s = dp.add_service_xdp((svc, 80), "v0", Some(ctl), Some(1500), true).expect("service");
                assert!(s.xdp, "{:?}", s.xdp_unavailable);
            }
            let host = |a: IpAddr| Prefix { addr: a, len: if a.is_ipv4() { 32 } else { 128 } };
            dp.migrate(host(IpAddr::V4(client4(5))), IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), None).expect("rule");
            dp.migrate(host(IpAddr::V4(client4(7))), IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), None).expect("rule");
            dp.drain(host(IpAddr::V4(client4(7))), Duration::from_secs(600)).expect("draining rule");
            dp.migrate(host(IpAddr::V6(client6(5))), IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)), None).expect("rule v6");
            let frozen = [(SocketAddr::new(IpAddr::V4(client4(5)), 40_009), SocketAddr::new(IpAddr::V4(svc4), 80))];
            dp.freeze(&frozen, Duration::from_secs(600)).expect("freeze");
            let v4 = |src: Ipv4Addr, sport: u16, flags: u8| Pkt::tcp(Ip::V4(src, svc4), sport, 80, flags);
            let v6 = |src: Ipv6Addr, flags: u8| Pkt::tcp(Ip::V6(src, svc6), 40_000, 80, flags);
            let (syn, ack, fin) = (0x02, 0x10, 0x11);
            // (what, packet, whether XDP forwards it itself)
            let cases: Vec<(&str, Vec<u8>, bool)> = vec![
                ("SYN of a migrated client (MSS lowered)", v4(client4(5), 40_000, syn).mss(1460).build(), true),
                ("SYN whose MSS already fits", v4(client4(5), 40_001, syn).mss(1200).build(), true),
                ("SYN without options", v4(client4(5), 40_002, syn).build(), true),
                ("ACK of a flow living on the target", v4(client4(5), 40_003, ack).build(), true),
                ("FIN of a flow living on the target", v4(client4(5), 40_004, fin).build(), true),
                ("ACK of a flow living here", v4(client4(5), local_port, ack).build(), false),
                ("ACK of a frozen flow", v4(client4(5), 40_009, ack).build(), false),
                ("SYN of a draining rule's client", v4(client4(7), 40_000, syn).mss(1460).build(), false),
                ("ACK of a draining rule's client, no socket", v4(client4(7), 40_000, ack).build(), true),
                ("client with no rule", v4(client4(6), 40_000, syn).mss(1460).build(), false),
                ("another port", Pkt::tcp(Ip::V4(client4(5), svc4), 40_000, 443, syn).build(), false),
                ("fragment", v4(client4(5), 40_000, syn).more_fragments().build(), false),
                ("IPv4 options", v4(client4(5), 40_000, syn).ip_options().build(), false),
                ("IPv6 SYN of a migrated client", v6(client6(5), syn).mss(1440).build(), true),
                ("IPv6 ACK of a flow living on the target", v6(client6(5), ack).build(), true),
                ("IPv6 extension header", v6(client6(5), syn).ext_header(60).build(), false),
                ("IPv6 client with no rule", v6(client6(6), syn).build(), false),
                ("UDP", Pkt::udp(Ip::V4(client4(5), svc4), 40_000, 80).build(), false),
                ("truncated TCP", v4(client4(5), 40_000, ack).build()[..40].to_vec(), false),
            ];
            for (what, pkt, forwards) in cases {
                let s0 = dp.stats().expect("stats");
                let x = dp.test_run_xdp(programs::XDP, &pkt, 1, ifindex).expect("XDP test run");
                let s1 = dp.stats().expect("stats");
                let tc = dp.test_run(programs::INGRESS, &pkt, 1).expect("TC test run");
                let s2 = dp.stats().expect("stats");
                let (by_xdp, by_tc) = (decisions(&s0, &s1), decisions(&s1, &s2));
                if forwards {
                    assert_eq!(x.retval, XDP_TX, "{what}: XDP forwards it (counted {by_xdp:?})");
                    assert_eq!(tc.retval, TC_ACT_REDIRECT, "{what}: the classifier forwards it too");
                    assert_eq!(by_xdp, by_tc, "{what}: counted as the classifier counts it");
                    assert_eq!(s1.get("xdp-forwarded"), s0.get("xdp-forwarded") + 1, "{what}");
                    assert_eq!(x.data_out[14..], tc.data_out[14..], "{what}: the same packet from the outer IP header on");
                    assert_eq!(x.data_out[..6], [2, 0, 0, 0, 0, 2], "{what}: to the target's MAC address");
                } else {
                    assert_eq!(x.retval, XDP_PASS, "{what}: XDP passes it (counted {by_xdp:?})");
                    assert!(by_xdp.is_empty(), "{what}: only xdp-passed counted by XDP, not {by_xdp:?}");
                    assert_eq!(s1.get("xdp-passed"), s0.get("xdp-passed") + 1, "{what}");
                    assert_eq!(x.data_out, pkt, "{what}: passed unchanged");
                }
            }
            drop(local);
        });
        let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&dir);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p));
}
