//! The ingress classifier driven with `BPF_PROG_TEST_RUN` on crafted packets: every decision
//! branch for IPv4 and IPv6, plus truncated, fragmented and garbage packets.
//!
//! Needs root. Each test runs in a fresh network namespace (socket lookups see only the
//! sockets the test makes) with its own bpffs, both gone when the test ends.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use redirector::datapath::{Datapath, Location, Prefix};
use redirector_common::programs;
use redirector_tests::packets::{self, Ip, Pkt};

/// TCX_NEXT: the packet goes on to the next program in the chain, then the stack.
const TCX_NEXT: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const SVC4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const CTL4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const TGT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 5);
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 6);
const SVC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const CTL6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const TGT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, 5);
/// A sibling's service address this host serves (adopted), not one of its own.
const ADOPTED4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
const ADOPTED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);

fn root_or_skip() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must run the classifier tests as root");
    redirector_tests::skip("the classifier tests need root");
    false
}

/// A bpffs mounted on a temporary folder, unmounted when dropped.
struct TempBpffs(PathBuf);

impl TempBpffs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("redirector-ct-{}-{}", std::process::id(), rand_u32()));
        std::fs::create_dir_all(&dir).expect("create bpffs dir");
        nix::mount::mount(Some("bpf"), &dir, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).expect("mount bpffs");
        Self(dir)
    }
}

impl Drop for TempBpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    #[expect(clippy::cast_possible_truncation, reason = "random bits")]
    let v = h.finish() as u32;
    v
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run command");
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `f` in a thread inside a fresh network namespace, with a datapath steering
/// SVC:80 (both families) and migrating CLIENT -> TGT.
fn with_datapath(f: impl FnOnce(&mut Datapath) + Send + 'static) {
    if !root_or_skip() {
        return;
    }
    let handle = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        sh(&["ip", "link", "set", "lo", "up"]);
        for a in ["198.18.0.10/32", "198.18.1.5/32", "198.18.1.6/32"] {
            sh(&["ip", "addr", "add", a, "dev", "lo"]);
        }
        for a in ["2001:db8::10/128", "2001:db8::1:5/128"] {
            sh(&["ip", "-6", "addr", "add", a, "dev", "lo", "nodad"]);
        }
        let fs = TempBpffs::new();
        let loc = Location { bpffs: fs.0.clone(), instance: "ct".into() };
        let mut dp = Datapath::open(&loc).expect("open datapath");
        dp.add_service((IpAddr::V4(SVC4), 80), "lo", Some(IpAddr::V4(CTL4)), Some(1500)).expect("service v4");
        dp.add_service((IpAddr::V6(SVC6), 80), "lo", Some(IpAddr::V6(CTL6)), Some(1500)).expect("service v6");
        with_rules(&mut dp);
        f(&mut dp);
        drop(dp);
        drop(fs);
    });
    if let Err(p) = handle.join() {
        std::panic::resume_unwind(p);
    }
}

fn with_rules(dp: &mut Datapath) {
    dp.migrate(Prefix { addr: IpAddr::V4(CLIENT4), len: 32 }, IpAddr::V4(TGT4), None).expect("rule v4");
    dp.migrate(Prefix { addr: IpAddr::V6(CLIENT6), len: 128 }, IpAddr::V6(TGT6), None).expect("rule v6");
}

fn without_rules(dp: &mut Datapath) {
    dp.release(Prefix { addr: IpAddr::V4(CLIENT4), len: 32 }).expect("release v4");
    dp.release(Prefix { addr: IpAddr::V6(CLIENT6), len: 128 }).expect("release v6");
}

/// Runs the classifier once on `pkt`; asserts the action and that exactly `counter` moved.
fn expect(dp: &mut Datapath, pkt: &[u8], action: i32, counter: &str) -> Vec<u8> {
    let before = dp.stats().expect("stats");
    let run = dp.test_run(programs::INGRESS, pkt, 1).expect("test run");
    let after = dp.stats().expect("stats");
    assert_eq!(run.retval, action, "expected action {action} ({counter}), got {}", run.retval);
    for (name, v) in &after.counters {
        let delta = v - before.get(name);
        let want = u64::from(*name == counter);
        assert_eq!(delta, want, "counter {name}: expected +{want}, got +{delta} (decision should be {counter})");
    }
    run.data_out
}

fn syn4(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    Pkt::tcp(Ip::V4(src, SVC4), sport, 80, packets::SYN).mss(1460).build()
}

fn ack4(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    Pkt::tcp(Ip::V4(src, SVC4), sport, 80, packets::ACK).payload(b"GET / HTTP/1.1\r\n\r\n").build()
}

fn syn6(src: Ipv6Addr, sport: u16) -> Vec<u8> {
    Pkt::tcp(Ip::V6(src, SVC6), sport, 80, packets::SYN).mss(1440).build()
}

fn ack6(src: Ipv6Addr, sport: u16) -> Vec<u8> {
    Pkt::tcp(Ip::V6(src, SVC6), sport, 80, packets::ACK).payload(b"hello").build()
}

#[test]
fn non_ip_and_other_traffic_pass() {
    with_datapath(|dp| {
        expect(dp, &packets::arp(), TCX_NEXT, "passed");
        let other_port = Pkt::tcp(Ip::V4(CLIENT4, SVC4), 4000, 443, packets::SYN).build();
        expect(dp, &other_port, TCX_NEXT, "passed");
        let udp = Pkt::udp(Ip::V4(CLIENT4, SVC4), 4000, 80).build();
        expect(dp, &udp, TCX_NEXT, "passed");
        let other_addr = Pkt::tcp(Ip::V6(CLIENT6, TGT6), 4000, 80, packets::SYN).build();
        expect(dp, &other_addr, TCX_NEXT, "passed");
    });
}

#[test]
fn clients_without_a_rule_pass() {
    with_datapath(|dp| {
        expect(dp, &syn4(OTHER4, 4000), TCX_NEXT, "passed-not-migrated");
        expect(dp, &ack4(OTHER4, 4000), TCX_NEXT, "passed-not-migrated");
        let other6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, 6);
        expect(dp, &syn6(other6, 4000), TCX_NEXT, "passed-not-migrated");
    });
}

#[test]
fn new_connection_of_migrated_client_is_tunnelled_with_clamped_mss_v4() {
    with_datapath(|dp| {
        let inner = syn4(CLIENT4, 4000);
        let out = expect(dp, &inner, TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out.len(), inner.len() + 20, "one IPv4 header added");
        // The redirect replaces the Ethernet header; it refuses one whose destination is multicast.
        assert_eq!(out[0] & 1, 0, "Ethernet destination not multicast");
        let outer = &out[14..34];
        assert_eq!(outer[0], 0x45);
        assert_eq!(outer[9], 4, "protocol IP-in-IP");
        assert_eq!(&outer[12..16], &CTL4.octets(), "outer source is the tunnel source");
        assert_eq!(&outer[16..20], &TGT4.octets(), "outer destination is the target");
        assert_eq!(usize::from(u16::from_be_bytes([outer[2], outer[3]])), out.len() - 14, "outer total length");
        assert!(packets::ipv4_header_ok(outer), "outer header checksum");
        let inner_out = &out[34..];
        assert_eq!(packets::tcp_mss(inner_out), Some(1440), "MSS clamped to 1500 - 60");
        assert!(packets::tcp_checksum_ok(inner_out), "TCP checksum fixed after the clamp");
        // Apart from the MSS, the client's packet is unchanged.
        let mut expected = inner[14..].to_vec();
        let mut got = inner_out.to_vec();
        packets::blank_mss_and_csum(&mut expected);
        packets::blank_mss_and_csum(&mut got);
        assert_eq!(got, expected, "inner packet unchanged but for the MSS");
    });
}

#[test]
fn new_connection_of_migrated_client_is_tunnelled_v6() {
    with_datapath(|dp| {
        let inner = syn6(CLIENT6, 4000);
        let out = expect(dp, &inner, TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out.len(), inner.len() + 40, "one IPv6 header added");
        let outer = &out[14..54];
        assert_eq!(outer[0] >> 4, 6);
        assert_eq!(outer[6], 41, "next header IPv6-in-IPv6");
        assert_eq!(&outer[8..24], &CTL6.octets());
        assert_eq!(&outer[24..40], &TGT6.octets());
        assert_eq!(usize::from(u16::from_be_bytes([outer[4], outer[5]])), inner.len() - 14, "payload length");
        let inner_out = &out[54..];
        assert_eq!(packets::tcp_mss(inner_out), Some(1400), "MSS clamped to 1500 - 100");
        assert!(packets::tcp_checksum_ok(inner_out));
    });
}

#[test]
fn small_mss_and_syn_without_options_are_left_alone() {
    with_datapath(|dp| {
        let small = Pkt::tcp(Ip::V4(CLIENT4, SVC4), 4001, 80, packets::SYN).mss(536).build();
        let out = expect(dp, &small, TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(&out[34..], &small[14..], "MSS below the clamp is not touched");
        let bare = Pkt::tcp(Ip::V4(CLIENT4, SVC4), 4002, 80, packets::SYN).build();
        let out = expect(dp, &bare, TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(&out[34..], &bare[14..]);
    });
}

#[test]
fn syn_acks_of_adopted_services_get_their_mss_clamped_on_egress() {
    with_datapath(|dp| {
        // This host adopts 198.18.0.20:80 (a sibling's service) with an uplink MTU of 1500.
        let adopted = Ipv4Addr::new(198, 18, 0, 20);
        dp.adopt((IpAddr::V4(adopted), 80), "lo", None, Some(1500)).expect("adopt");
        let syn_ack = Pkt::tcp(Ip::V4(adopted, CLIENT4), 80, 4000, packets::SYN | packets::ACK).mss(1460).build();
        let before = dp.stats().expect("stats").get("clamped-syn-ack");
        let run = dp.test_run(programs::EGRESS, &syn_ack, 1).expect("run egress");
        assert_eq!(run.retval, TCX_NEXT);
        assert_eq!(packets::tcp_mss(&run.data_out[14..]), Some(1440), "SYN-ACK MSS clamped to 1500 - 60");
        assert!(packets::tcp_checksum_ok(&run.data_out[14..]), "checksum fixed");
        assert_eq!(dp.stats().expect("stats").get("clamped-syn-ack"), before + 1);
        // Other SYN-ACKs (not from an adopted service) are untouched.
        let own = Pkt::tcp(Ip::V4(SVC4, CLIENT4), 80, 4000, packets::SYN | packets::ACK).mss(1460).build();
        let run = dp.test_run(programs::EGRESS, &own, 1).expect("run egress");
        assert_eq!(run.data_out, own);
        // A plain ACK of the adopted service is untouched.
        let ack = Pkt::tcp(Ip::V4(adopted, CLIENT4), 80, 4000, packets::ACK).build();
        assert_eq!(dp.test_run(programs::EGRESS, &ack, 1).expect("run egress").data_out, ack);
        dp.unadopt((IpAddr::V4(adopted), 80)).expect("unadopt");
    });
}

/// Options of a SYN with the MSS last: timestamps first (as some stacks and middleboxes
/// send them), then window scale, then the MSS at `at`, found by the kernel's scan.
fn mss_last(mss: u16, nops: usize) -> (Vec<u8>, usize) {
    let mut o = vec![1; nops];
    o.extend_from_slice(&[8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 3, 3, 7]);
    let at = o.len();
    o.push(2);
    o.push(4);
    o.extend_from_slice(&mss.to_be_bytes());
    while !o.len().is_multiple_of(4) {
        o.push(0);
    }
    (o, at)
}

#[test]
fn an_mss_after_other_options_is_clamped_too() {
    with_datapath(|dp| {
        // The MSS after other options, as far back as 40 bytes of options allow.
        for nops in [0, 2, 19] {
            let (opts, at) = mss_last(1460, nops);
            let syn = Pkt::tcp(Ip::V4(CLIENT4, SVC4), 4000, 80, packets::SYN).tcp_options(&opts).build();
            let out = expect(dp, &syn, TC_ACT_REDIRECT, "forwarded-new");
            let inner = &out[34..];
            assert_eq!(packets::tcp_mss(inner), Some(1440), "MSS at option byte {at} clamped to 1500 - 60");
            assert!(packets::tcp_checksum_ok(inner), "TCP checksum fixed after the clamp");
            let (opts6, _) = mss_last(1440, nops);
            let syn6 = Pkt::tcp(Ip::V6(CLIENT6, SVC6), 4000, 80, packets::SYN).tcp_options(&opts6).build();
            let out = expect(dp, &syn6, TC_ACT_REDIRECT, "forwarded-new");
            assert_eq!(packets::tcp_mss(&out[54..]), Some(1400), "IPv6: MSS at option byte {at} clamped to 1500 - 100");
            assert!(packets::tcp_checksum_ok(&out[54..]));
        }
        // A SYN-ACK of an adopted service, on egress.
        dp.adopt((IpAddr::V4(ADOPTED4), 80), "lo", None, Some(1500)).expect("adopt");
        let (opts, _) = mss_last(1460, 19);
        let syn_ack = Pkt::tcp(Ip::V4(ADOPTED4, CLIENT4), 80, 4000, packets::SYN | packets::ACK).tcp_options(&opts).build();
        let run = dp.test_run(programs::EGRESS, &syn_ack, 1).expect("run egress");
        assert_eq!(packets::tcp_mss(&run.data_out[14..]), Some(1440), "SYN-ACK MSS after other options clamped");
        assert!(packets::tcp_checksum_ok(&run.data_out[14..]));
        // An MSS past the end of the options (their length says 40, the option lies beyond):
        // left alone.
        let mut long = vec![1; 38];
        long.extend_from_slice(&[2, 4]);
        let syn = Pkt::tcp(Ip::V4(CLIENT4, SVC4), 4001, 80, packets::SYN).tcp_options(&long).payload(&[0x05, 0xb4]).build();
        let out = expect(dp, &syn, TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(&out[34..], &syn[14..], "a truncated MSS is not touched, nor the payload after it");
        dp.unadopt((IpAddr::V4(ADOPTED4), 80)).expect("unadopt");
    });
}

/// Loading a program costs the verifier's walk through its paths; past 1,000,000 instructions
/// processed the kernel refuses it. The MSS scan once took more than 600,000 in each of the
/// two classifiers (seconds of every agent's start).
#[test]
fn every_program_is_verified_in_a_small_share_of_the_kernels_limit() {
    if !root_or_skip() {
        return;
    }
    let fs = TempBpffs::new();
    let programs = redirector::datapath::verify_programs(&fs.0).expect("the verifier accepts every program");
    assert_eq!(programs.len(), 5);
    for p in &programs {
        assert!(p.instructions > 0, "the kernel says how many instructions it processed for {}", p.name);
        assert!(p.instructions <= 150_000, "{} verified within 15% of the kernel's limit: {} instructions processed", p.name, p.instructions);
    }
}

#[test]
fn packets_of_flows_without_a_local_socket_follow_the_rule() {
    with_datapath(|dp| {
        let pkt = ack4(CLIENT4, 4000);
        let out = expect(dp, &pkt, TC_ACT_REDIRECT, "forwarded-existing");
        assert_eq!(&out[34..], &pkt[14..], "inner packet unchanged");
        let rst = Pkt::tcp(Ip::V4(CLIENT4, SVC4), 4000, 80, packets::RST).build();
        expect(dp, &rst, TC_ACT_REDIRECT, "forwarded-existing");
        let out = expect(dp, &ack6(CLIENT6, 4000), TC_ACT_REDIRECT, "forwarded-existing");
        assert_eq!(out[14 + 6], 41);
    });
}

#[test]
fn flows_with_a_local_socket_stay() {
    with_datapath(|dp| {
        // The classifier sits on lo here: connect while the clients have no rule, as a
        // connection opened before the migration.
        without_rules(dp);
        let listener = TcpListener::bind((SVC4, 80)).expect("listen v4");
        let sock = nix_connect(IpAddr::V4(CLIENT4), SocketAddr::new(IpAddr::V4(SVC4), 80));
        let (_server_side, _) = listener.accept().expect("accept");
        let cport = sock.local_addr().expect("local addr").port();
        with_rules(dp);
        expect(dp, &ack4(CLIENT4, cport), TCX_NEXT, "kept-local");
        // Another port of the same client has no socket here: it follows the rule.
        expect(dp, &ack4(CLIENT4, cport.wrapping_add(1)), TC_ACT_REDIRECT, "forwarded-existing");
        without_rules(dp);

        let listener6 = TcpListener::bind((SVC6, 80)).expect("listen v6");
        let sock6 = nix_connect(IpAddr::V6(CLIENT6), SocketAddr::new(IpAddr::V6(SVC6), 80));
        let (_s6, _) = listener6.accept().expect("accept v6");
        with_rules(dp);
        let cport6 = sock6.local_addr().expect("local addr").port();
        expect(dp, &ack6(CLIENT6, cport6), TCX_NEXT, "kept-local");
        // A listener alone does not keep a non-cookie ACK.
        expect(dp, &ack6(CLIENT6, cport6.wrapping_add(1)), TC_ACT_REDIRECT, "forwarded-existing");
    });
}

#[test]
fn time_wait_sockets_are_passed_by_an_active_rule_and_kept_by_a_draining_one() {
    with_datapath(|dp| {
        without_rules(dp);
        let cport = time_wait_flow(IpAddr::V4(CLIENT4), SocketAddr::new(IpAddr::V4(SVC4), 80));
        with_rules(dp);
        // Rule active: the connection that ended here is over, new ones of the client live on
        // the target. A late retransmission of the client's FIN and the ACK of a new
        // incarnation of the same ports (a reused source port) both go there.
        let fin = Pkt::tcp(Ip::V4(CLIENT4, SVC4), cport, 80, packets::FIN | packets::ACK).build();
        let out = expect(dp, &fin, TC_ACT_REDIRECT, "forwarded-time-wait");
        assert_eq!(&out[30..34], &TGT4.octets(), "sent to the target");
        assert_eq!(&out[34..], &fin[14..], "inner packet unchanged");
        expect(dp, &ack4(CLIENT4, cport), TC_ACT_REDIRECT, "forwarded-time-wait");
        // The ICMP error about such a flow follows it.
        let quoted = Pkt::tcp(Ip::V4(SVC4, CLIENT4), 80, cport, packets::ACK).build();
        let icmp = packets::icmp4_frag_needed(Ipv4Addr::new(198, 18, 0, 254), SVC4, &quoted[14..], 1400);
        expect(dp, &icmp, TC_ACT_REDIRECT, "icmp-relayed");
        // Rule draining: new connections are served here, so a time-wait socket here is a
        // flow living here.
        dp.drain(Prefix { addr: IpAddr::V4(CLIENT4), len: 32 }, Duration::from_secs(30)).expect("drain");
        expect(dp, &fin, TCX_NEXT, "kept-local");
        expect(dp, &ack4(CLIENT4, cport), TCX_NEXT, "kept-local");
        expect(dp, &icmp, TCX_NEXT, "kept-local");

        // The same for IPv6.
        without_rules(dp);
        let cport6 = time_wait_flow(IpAddr::V6(CLIENT6), SocketAddr::new(IpAddr::V6(SVC6), 80));
        with_rules(dp);
        let fin6 = Pkt::tcp(Ip::V6(CLIENT6, SVC6), cport6, 80, packets::FIN | packets::ACK).build();
        let out = expect(dp, &fin6, TC_ACT_REDIRECT, "forwarded-time-wait");
        assert_eq!(&out[14 + 24..14 + 40], &TGT6.octets(), "sent to the target");
        assert_eq!(&out[54..], &fin6[14..], "inner packet unchanged");
        expect(dp, &ack6(CLIENT6, cport6), TC_ACT_REDIRECT, "forwarded-time-wait");
        dp.drain(Prefix { addr: IpAddr::V6(CLIENT6), len: 128 }, Duration::from_secs(30)).expect("drain v6");
        expect(dp, &fin6, TCX_NEXT, "kept-local");
        expect(dp, &ack6(CLIENT6, cport6), TCX_NEXT, "kept-local");
    });
}

#[test]
fn ipv6_prefixes_match_longest_first() {
    with_datapath(|dp| {
        let wide: Prefix = "2001:db8:0:2::/64".parse().expect("prefix");
        dp.migrate(wide, IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3)), None).expect("wide rule");
        let narrow: Prefix = "2001:db8:0:2::80/121".parse().expect("prefix");
        dp.migrate(narrow, IpAddr::V6(TGT6), None).expect("narrow rule");
        let client = |last: u16| Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, last);
        let out = expect(dp, &syn6(client(7), 4000), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[14 + 24 + 15], 3, "/64 target");
        let out = expect(dp, &syn6(client(0x90), 4000), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[14 + 24..14 + 40], TGT6.octets(), "/121 target");
        expect(dp, &syn6(Ipv6Addr::new(0x2001, 0xdb8, 0, 3, 0, 0, 0, 7), 4000), TCX_NEXT, "passed-not-migrated");
    });
}

#[test]
fn a_siblings_tunnel_with_outer_options_or_fragments_is_dropped() {
    with_datapath(|dp| {
        dp.add_sibling(IpAddr::V4(CTL4), "lo").expect("sibling");
        dp.adopt((IpAddr::V4(ADOPTED4), 80), "lo", None, Some(1500)).expect("adopt");
        let inner = Pkt::tcp(Ip::V4(CLIENT4, ADOPTED4), 4000, 80, packets::ACK).build();
        let good = packets::encap4(CTL4, TGT4, &inner);
        expect(dp, &good, TCX_NEXT, "decapsulated");
        // More-fragments set on the outer header (checksum untouched: the classifier does not
        // verify it, the stack would).
        let mut frag = good.clone();
        frag[14 + 6] |= 0x20;
        expect(dp, &frag, TC_ACT_SHOT, "dropped-bad");
        // An outer header of 24 bytes (IHL 6): never ours.
        let mut opts = good[..14].to_vec();
        opts.extend_from_slice(&good[14..34]);
        opts[14] = 0x46;
        opts.extend_from_slice(&[1, 1, 1, 0]);
        opts.extend_from_slice(&good[34..]);
        expect(dp, &opts, TC_ACT_SHOT, "dropped-bad");
    });
}

/// A flow from `client` to the service at `svc` whose server side ends in TIME_WAIT (the server
/// closes first); returns the client's port once the server side is in `TIME_WAIT` and the
/// client's side is gone.
fn time_wait_flow(client: IpAddr, svc: SocketAddr) -> u16 {
    let listener = TcpListener::bind(svc).expect("listen");
    let sock = nix_connect(client, svc);
    let (server_side, _) = listener.accept().expect("accept");
    let port = sock.local_addr().expect("addr").port();
    let (server, client) = (svc.to_string(), SocketAddr::new(client, port).to_string());
    drop(server_side);
    wait_for_sockets("the client to receive the server's FIN", "close-wait", &client, &server, true);
    drop(sock);
    wait_for_sockets("the server side to enter TIME_WAIT", "time-wait", &server, &client, true);
    // The client's own socket (the peer of the server's) has closed: only the server's is left.
    wait_for_sockets("the client side to close", "all", &client, &server, false);
    port
}

/// Waits until `ss` lists (or, if not `listed`, no longer lists) a socket in `state` from
/// `local` to `peer` in this thread's namespace (bounded: 10 s).
fn wait_for_sockets(what: &str, state: &str, local: &str, peer: &str, listed: bool) {
    let start = std::time::Instant::now();
    loop {
        let out = Command::new("ss").args(["-Htan", "state", state]).output().expect("ss");
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let found = out.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.windows(2).any(|w| w[0] == local && w[1] == peer)
        });
        if found == listed {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting for {what}: ss state {state} shows\n{out}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects a TCP socket bound to `src` to `dst` (in this thread's network namespace).
fn nix_connect(src: IpAddr, dst: SocketAddr) -> TcpStream {
    redirector_tests::app::connect_here(src, dst).unwrap_or_else(|e| panic!("connect {src} -> {dst}: {e}"))
}

#[test]
fn draining_rule_keeps_new_flows_and_forwards_old_ones() {
    with_datapath(|dp| {
        dp.drain(Prefix { addr: IpAddr::V4(CLIENT4), len: 32 }, Duration::from_secs(30)).expect("drain");
        expect(dp, &syn4(CLIENT4, 4000), TCX_NEXT, "kept-draining");
        expect(dp, &ack4(CLIENT4, 4000), TC_ACT_REDIRECT, "forwarded-existing");
        dp.drain(Prefix { addr: IpAddr::V6(CLIENT6), len: 128 }, Duration::from_secs(30)).expect("drain v6");
        expect(dp, &syn6(CLIENT6, 4000), TCX_NEXT, "kept-draining");
        expect(dp, &ack6(CLIENT6, 4000), TC_ACT_REDIRECT, "forwarded-existing");
    });
}

#[test]
fn a_draining_rule_moved_again_to_its_target_is_active_again() {
    // Starting and stopping a drain changes a host slot in place (no grace period): the
    // classifier must see each state at once.
    with_datapath(|dp| {
        for round in 0..3 {
            let p4 = Prefix { addr: IpAddr::V4(CLIENT4), len: 32 };
            dp.drain(p4, Duration::from_secs(30)).expect("drain");
            expect(dp, &syn4(CLIENT4, 4000 + round), TCX_NEXT, "kept-draining");
            expect(dp, &ack4(CLIENT4, 4000 + round), TC_ACT_REDIRECT, "forwarded-existing");
            dp.migrate(p4, IpAddr::V4(TGT4), None).expect("migrate again");
            expect(dp, &syn4(CLIENT4, 4100 + round), TC_ACT_REDIRECT, "forwarded-new");
            let p6 = Prefix { addr: IpAddr::V6(CLIENT6), len: 128 };
            dp.drain(p6, Duration::from_secs(30)).expect("drain v6");
            expect(dp, &syn6(CLIENT6, 4000 + round), TCX_NEXT, "kept-draining");
            dp.migrate(p6, IpAddr::V6(TGT6), None).expect("migrate v6 again");
            expect(dp, &syn6(CLIENT6, 4100 + round), TC_ACT_REDIRECT, "forwarded-new");
        }
    });
}

#[test]
fn drained_rule_is_inert_and_collected() {
    with_datapath(|dp| {
        dp.drain(Prefix { addr: IpAddr::V4(CLIENT4), len: 32 }, Duration::from_millis(1)).expect("drain");
        std::thread::sleep(Duration::from_millis(20));
        expect(dp, &syn4(CLIENT4, 4000), TCX_NEXT, "passed-not-migrated");
        expect(dp, &ack4(CLIENT4, 4000), TCX_NEXT, "passed-not-migrated");
        assert_eq!(dp.collect_drained().expect("collect"), 1, "the drained rule is removed");
        assert!(dp.list_rules().expect("list").iter().all(|r| r.prefix.addr != IpAddr::V4(CLIENT4)));
    });
}

#[test]
fn clients_far_from_any_rule_take_the_short_path_and_rules_reach_everywhere() {
    with_datapath(|dp| {
        // 198.18.77.5 has no rule in its /24: it passes after the /24 bitmap read.
        let far = Ipv4Addr::new(198, 18, 77, 5);
        expect(dp, &syn4(far, 4000), TCX_NEXT, "passed-not-migrated");
        // A rule for it: its bit is set before the rule appears, so it is steered at once.
        dp.migrate(Prefix { addr: IpAddr::V4(far), len: 32 }, IpAddr::V4(TGT4), None).expect("rule");
        expect(dp, &syn4(far, 4001), TC_ACT_REDIRECT, "forwarded-new");
        // A /16 rule covers every /24 inside it.
        dp.migrate(Prefix { addr: IpAddr::V4(Ipv4Addr::new(198, 19, 0, 0)), len: 16 }, IpAddr::V4(TGT4), None).expect("/16 rule");
        expect(dp, &syn4(Ipv4Addr::new(198, 19, 200, 9), 4000), TC_ACT_REDIRECT, "forwarded-new");
        // A released rule leaves its bit (a stale bit only means the full path): still correct.
        dp.release(Prefix { addr: IpAddr::V4(far), len: 32 }).expect("release");
        expect(dp, &syn4(far, 4002), TCX_NEXT, "passed-not-migrated");
    });
}

#[test]
fn prefixes_match_longest_first() {
    with_datapath(|dp| {
        let wide = Prefix { addr: IpAddr::V4(Ipv4Addr::new(198, 18, 2, 0)), len: 24 };
        dp.migrate(wide, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3)), None).expect("wide rule");
        let narrow = Prefix { addr: IpAddr::V4(Ipv4Addr::new(198, 18, 2, 128)), len: 25 };
        dp.migrate(narrow, IpAddr::V4(TGT4), None).expect("narrow rule");
        let out = expect(dp, &syn4(Ipv4Addr::new(198, 18, 2, 7), 4000), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[30..34], [198, 18, 0, 3], "/24 target");
        let out = expect(dp, &syn4(Ipv4Addr::new(198, 18, 2, 200), 4000), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[30..34], TGT4.octets(), "/25 target");
    });
}

#[test]
fn single_addresses_sharing_a_slot_find_their_own_rule_which_beats_a_prefix() {
    with_datapath(|dp| {
        let other = Ipv4Addr::new(198, 18, 0, 3);
        // Same low 16 bits: one host slot, two rules (the slot sends readers to their map).
        let (a, b) = (Ipv4Addr::new(198, 18, 5, 9), Ipv4Addr::new(198, 19, 5, 9));
        dp.migrate(Prefix { addr: IpAddr::V4(a), len: 32 }, IpAddr::V4(TGT4), None).expect("rule a");
        dp.migrate(Prefix { addr: IpAddr::V4(b), len: 32 }, IpAddr::V4(other), None).expect("rule b");
        let out = expect(dp, &syn4(a, 4000), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[30..34], TGT4.octets(), "a's target");
        let out = expect(dp, &syn4(b, 4000), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[30..34], other.octets(), "b's target");
        // A prefix over a's slot: a keeps its own rule, its neighbours take the prefix's.
        let prefix_target = Ipv4Addr::new(198, 18, 0, 4);
        dp.migrate(Prefix { addr: IpAddr::V4(Ipv4Addr::new(198, 18, 5, 0)), len: 24 }, IpAddr::V4(prefix_target), None).expect("/24 rule");
        let out = expect(dp, &syn4(a, 4001), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[30..34], TGT4.octets(), "a single address's rule beats the prefix's");
        let out = expect(dp, &syn4(Ipv4Addr::new(198, 18, 5, 10), 4000), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[30..34], prefix_target.octets(), "the /24's target");
        let out = expect(dp, &syn4(b, 4001), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[30..34], other.octets(), "b, outside the /24, in a slot the /24 covers");
        // Released: a falls back to the prefix; the prefix released, b alone is left.
        dp.release(Prefix { addr: IpAddr::V4(a), len: 32 }).expect("release a");
        let out = expect(dp, &syn4(a, 4002), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[30..34], prefix_target.octets(), "a under the /24 again");
        dp.release(Prefix { addr: IpAddr::V4(Ipv4Addr::new(198, 18, 5, 0)), len: 24 }).expect("release /24");
        expect(dp, &syn4(a, 4003), TCX_NEXT, "passed-not-migrated");
        let out = expect(dp, &syn4(b, 4002), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[30..34], other.octets(), "b still");
        // IPv6: three addresses in one slot, two migrated.
        let v6 = |hi: u16| Ipv6Addr::new(0x2001, 0xdb8, 0, 5, 0, 0, hi, 0x0509);
        dp.migrate(Prefix { addr: IpAddr::V6(v6(0xa)), len: 128 }, IpAddr::V6(TGT6), None).expect("rule v6 a");
        let other6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3);
        dp.migrate(Prefix { addr: IpAddr::V6(v6(0xb)), len: 128 }, IpAddr::V6(other6), None).expect("rule v6 b");
        let out = expect(dp, &syn6(v6(0xa), 4000), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[14 + 24..14 + 40], TGT6.octets(), "v6 a's target");
        let out = expect(dp, &syn6(v6(0xb), 4000), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[14 + 24..14 + 40], other6.octets(), "v6 b's target");
        expect(dp, &syn6(v6(0xc), 4000), TCX_NEXT, "passed-not-migrated");
        let listed: Vec<String> = dp.list_rules().expect("rules").iter().map(|r| r.prefix.to_string()).collect();
        // with_datapath's two rules, b, and the two IPv6 ones: whichever map holds them.
        assert_eq!(listed, ["198.18.1.5/32", "198.19.5.9/32", "2001:db8::1:5/128", "2001:db8:0:5::a:509/128", "2001:db8:0:5::b:509/128"], "every rule is listed");
    });
}

#[test]
fn ten_thousand_rules_are_listed_whole_and_released() {
    with_datapath(|dp| {
        // More than one batch of the hash maps' reads (4,096 entries each).
        let v4: Vec<Prefix> = (0..10_000u32).map(|i| Prefix { addr: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i)), len: 32 }).collect();
        let v6: Vec<Prefix> = (0..5_000u16).map(|i| Prefix { addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 9, 0, 0, 1, i)), len: 128 }).collect();
        dp.migrate_many(&v4, IpAddr::V4(TGT4), None, false).expect("v4 rules");
        dp.migrate_many(&v6, IpAddr::V6(TGT6), None, false).expect("v6 rules");
        let listed: std::collections::HashSet<Prefix> = dp.list_rules().expect("rules").iter().map(|r| r.prefix).collect();
        // with_datapath's two rules, and every one of these, once.
        assert_eq!(listed.len(), 2 + v4.len() + v6.len());
        assert!(v4.iter().chain(&v6).all(|p| listed.contains(p)), "every rule listed");
        let out = expect(dp, &syn4(Ipv4Addr::new(198, 19, 39, 15), 4000), TC_ACT_REDIRECT, "forwarded-new");
        assert_eq!(out[30..34], TGT4.octets(), "the 10,000th client (198.19.39.15) is steered");
        assert_eq!(dp.release_many(&v4).expect("release v4"), v4.len());
        assert_eq!(dp.release_many(&v6).expect("release v6"), v6.len());
        assert_eq!(dp.list_rules().expect("rules").len(), 2, "only with_datapath's rules are left");
        expect(dp, &syn4(Ipv4Addr::new(198, 19, 39, 15), 4001), TCX_NEXT, "passed-not-migrated");
    });
}

#[test]
fn fragments_and_options_are_never_steered() {
    with_datapath(|dp| {
        let frag = Pkt::tcp(Ip::V4(CLIENT4, SVC4), 4000, 80, packets::SYN).more_fragments().build();
        expect(dp, &frag, TCX_NEXT, "passed-fragment");
        let later = Pkt::tcp(Ip::V4(CLIENT4, SVC4), 4000, 80, packets::ACK).frag_offset(185).build();
        expect(dp, &later, TCX_NEXT, "passed-fragment");
        let opts = Pkt::tcp(Ip::V4(CLIENT4, SVC4), 4000, 80, packets::SYN).ip_options().build();
        expect(dp, &opts, TCX_NEXT, "passed-options");
        let frag6 = Pkt::tcp(Ip::V6(CLIENT6, SVC6), 4000, 80, packets::SYN).ext_header(44).build();
        expect(dp, &frag6, TCX_NEXT, "passed-fragment");
        let hop6 = Pkt::tcp(Ip::V6(CLIENT6, SVC6), 4000, 80, packets::SYN).ext_header(0).build();
        expect(dp, &hop6, TCX_NEXT, "passed-options");
    });
}

#[test]
fn truncated_packets_pass_untouched() {
    with_datapath(|dp| {
        // BPF_PROG_TEST_RUN itself refuses IP frames shorter than the IP header, so the
        // truncations start there.
        let syn = syn4(CLIENT4, 4000);
        for len in [34, 40, 53] {
            let out = expect(dp, &syn[..len], TCX_NEXT, "passed-malformed");
            assert_eq!(out, &syn[..len], "a truncated packet ({len} bytes) is not modified");
        }
        let syn6 = syn6(CLIENT6, 4000);
        for len in [54, 60, 73] {
            expect(dp, &syn6[..len], TCX_NEXT, "passed-malformed");
        }
        let mut short_ihl = syn.clone();
        short_ihl[14] = 0x43;
        expect(dp, &short_ihl, TCX_NEXT, "passed-malformed");
        let mut long_ihl = syn[..40].to_vec();
        long_ihl[14] = 0x4f;
        expect(dp, &long_ihl, TCX_NEXT, "passed-options");
        let mut bad_version = syn.clone();
        bad_version[14] = 0x65;
        expect(dp, &bad_version, TCX_NEXT, "passed-malformed");
    });
}

#[test]
fn garbage_never_crashes_or_steers() {
    with_datapath(|dp| {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for i in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = 54 + usize::try_from(seed % 120).unwrap();
            let mut pkt: Vec<u8> = (0..len)
                .map(|j| {
                    let x = seed.rotate_left(u32::try_from(j % 64).unwrap()) ^ (j as u64 * 0x9e37_79b9);
                    x.to_le_bytes()[j % 8]
                })
                .collect();
            // Half of them claim to be IP so the parsers get exercised.
            if i % 2 == 0 {
                pkt[12] = 0x08;
                pkt[13] = 0x00;
                pkt[14] = 0x45;
            } else if i % 4 == 1 {
                pkt[12] = 0x86;
                pkt[13] = 0xdd;
                pkt[14] = 0x60;
            }
            let run = dp.test_run(programs::INGRESS, &pkt, 1).expect("test run");
            assert!(run.retval == TCX_NEXT || run.retval == TC_ACT_SHOT, "garbage packet {i} was steered (action {}): {pkt:02x?}", run.retval);
        }
    });
}

#[test]
fn tunnels_are_decapsulated_only_from_siblings_and_only_for_adopted_services() {
    with_datapath(|dp| {
        dp.add_sibling(IpAddr::V4(CTL4), "lo").expect("sibling v4");
        dp.add_sibling(IpAddr::V6(CTL6), "lo").expect("sibling v6");
        dp.adopt((IpAddr::V4(ADOPTED4), 80), "lo", None, Some(1500)).expect("adopt v4");
        dp.adopt((IpAddr::V6(ADOPTED6), 80), "lo", None, Some(1500)).expect("adopt v6");
        let inner = Pkt::tcp(Ip::V4(CLIENT4, ADOPTED4), 4000, 80, packets::ACK).payload(b"GET /").build();
        let tunnelled = packets::encap4(CTL4, TGT4, &inner);
        let out = expect(dp, &tunnelled, TCX_NEXT, "decapsulated");
        assert_eq!(out, inner, "decapsulation gives back the client's packet");
        let stranger = packets::encap4(Ipv4Addr::new(198, 18, 1, 9), TGT4, &inner);
        expect(dp, &stranger, TC_ACT_SHOT, "dropped-bad");
        // A stranger's tunnel flooded to this host for another's MAC address: the stack's to
        // drop, not a bad tunnel. A sibling's is decapsulated as ever (this node's own frames
        // arrive for another address on a lower device of a bridge or macvlan).
        let flooded = packets::for_another_host(&stranger);
        assert_eq!(expect(dp, &flooded, TCX_NEXT, "passed"), flooded, "left untouched");
        expect(dp, &packets::for_another_host(&tunnelled), TCX_NEXT, "decapsulated");
        let inner6 = Pkt::tcp(Ip::V6(CLIENT6, ADOPTED6), 4000, 80, packets::ACK).build();
        let out = expect(dp, &packets::encap6(CTL6, TGT6, &inner6), TCX_NEXT, "decapsulated");
        assert_eq!(out, inner6);
        expect(dp, &packets::encap6(CLIENT6, TGT6, &inner6), TC_ACT_SHOT, "dropped-bad");
        // A sibling's tunnel with a truncated or foreign inner packet is dropped too.
        expect(dp, &tunnelled[..40], TC_ACT_SHOT, "dropped-bad");
        let mut wrong_inner = tunnelled.clone();
        wrong_inner[34] = 0x60;
        expect(dp, &wrong_inner, TC_ACT_SHOT, "dropped-bad");
        // IPv6 inside IPv4 and IPv4 inside IPv6 are never ours.
        let mut six_in_four = packets::encap4(CTL4, TGT4, &inner6);
        six_in_four[14 + 9] = 41;
        expect(dp, &six_in_four, TC_ACT_SHOT, "dropped-bad");
        let mut four_in_six = packets::encap6(CTL6, TGT6, &inner);
        four_in_six[14 + 6] = 4;
        expect(dp, &four_in_six, TC_ACT_SHOT, "dropped-bad");
        // A sibling's tunnel for something not adopted here (another address, another port,
        // not TCP) is dropped: a sibling cannot inject arbitrary packets.
        for other in [
            Pkt::tcp(Ip::V4(CLIENT4, Ipv4Addr::new(198, 18, 0, 99)), 4000, 80, packets::ACK).build(),
            Pkt::tcp(Ip::V4(CLIENT4, ADOPTED4), 4000, 22, packets::ACK).build(),
            Pkt::udp(Ip::V4(CLIENT4, ADOPTED4), 4000, 80).build(),
        ] {
            expect(dp, &packets::encap4(CTL4, TGT4, &other), TC_ACT_SHOT, "dropped-not-adopted");
        }
        let other6 = Pkt::tcp(Ip::V6(CLIENT6, ADOPTED6), 4000, 22, packets::ACK).build();
        expect(dp, &packets::encap6(CTL6, TGT6, &other6), TC_ACT_SHOT, "dropped-not-adopted");
        // An ICMP error relayed by the origin, about a flow of the adopted service, goes in.
        let quoted = Pkt::tcp(Ip::V4(ADOPTED4, CLIENT4), 80, 4000, packets::ACK).build();
        let icmp = packets::icmp4_frag_needed(Ipv4Addr::new(198, 18, 0, 254), ADOPTED4, &quoted[14..], 1400);
        expect(dp, &packets::encap4(CTL4, TGT4, &icmp), TCX_NEXT, "decapsulated");
        let quoted6 = Pkt::tcp(Ip::V6(ADOPTED6, CLIENT6), 80, 4000, packets::ACK).build();
        let ptb = packets::icmp6_too_big(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe), ADOPTED6, &quoted6[14..], 1280);
        expect(dp, &packets::encap6(CTL6, TGT6, &ptb), TCX_NEXT, "decapsulated");
    });
}

#[test]
fn icmp_errors_about_flows_on_the_target_are_relayed() {
    with_datapath(|dp| {
        // "Fragmentation needed" about a reply of ours (SVC:80 -> client:4000), sent to SVC.
        let quoted = Pkt::tcp(Ip::V4(SVC4, CLIENT4), 80, 4000, packets::ACK).payload(&[0; 32]).build();
        let icmp = packets::icmp4_frag_needed(Ipv4Addr::new(198, 18, 0, 254), SVC4, &quoted[14..], 1400);
        let out = expect(dp, &icmp, TC_ACT_REDIRECT, "icmp-relayed");
        assert_eq!(&out[34..], &icmp[14..], "the ICMP error is relayed unchanged");
        assert_eq!(out[14 + 9], 4);
        // About a client without a rule: passes.
        let quoted_other = Pkt::tcp(Ip::V4(SVC4, OTHER4), 80, 4000, packets::ACK).build();
        let icmp_other = packets::icmp4_frag_needed(Ipv4Addr::new(198, 18, 0, 254), SVC4, &quoted_other[14..], 1400);
        expect(dp, &icmp_other, TCX_NEXT, "passed-not-migrated");
        // An echo request is no error: passes.
        expect(dp, &packets::icmp4_echo(CLIENT4, SVC4), TCX_NEXT, "passed");
        // Truncated quote: passes untouched.
        expect(dp, &icmp[..14 + 20 + 8 + 20 + 4], TCX_NEXT, "passed-malformed");
        // ICMPv6 packet too big.
        let quoted6 = Pkt::tcp(Ip::V6(SVC6, CLIENT6), 80, 4000, packets::ACK).payload(&[0; 32]).build();
        let ptb = packets::icmp6_too_big(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe), SVC6, &quoted6[14..], 1280);
        let out = expect(dp, &ptb, TC_ACT_REDIRECT, "icmp-relayed");
        assert_eq!(&out[54..], &ptb[14..]);
    });
}

#[test]
fn icmp_errors_about_local_flows_stay() {
    with_datapath(|dp| {
        without_rules(dp);
        let listener = TcpListener::bind((SVC4, 80)).expect("listen");
        let sock = nix_connect(IpAddr::V4(CLIENT4), SocketAddr::new(IpAddr::V4(SVC4), 80));
        let (_srv, _) = listener.accept().expect("accept");
        with_rules(dp);
        let cport = sock.local_addr().expect("addr").port();
        let quoted = Pkt::tcp(Ip::V4(SVC4, CLIENT4), 80, cport, packets::ACK).build();
        let icmp = packets::icmp4_frag_needed(Ipv4Addr::new(198, 18, 0, 254), SVC4, &quoted[14..], 1400);
        expect(dp, &icmp, TCX_NEXT, "kept-local");
    });
}

#[test]
fn probe_answers_count_only_when_they_acknowledge_the_probe() {
    with_datapath(|dp| {
        use aya::maps::{HashMap, Map, MapData};
        use redirector_common::ProbeValue;
        let pin = dp.dir().join(redirector_common::maps::PROBES);
        let mut probes: HashMap<MapData, u32, ProbeValue> = HashMap::try_from(Map::HashMap(MapData::from_pin(&pin).expect("PROBES pinned"))).expect("PROBES");
        let isn = 0x1234_5678_u32;
        for port in [45_000u16, 45_001, 45_002] {
            probes.insert(u32::from(port), ProbeValue { tcp_flags: 0, _pad: [0; 3], ack: isn + 1, seen_ns: 0 }, 0).expect("probe entry");
        }
        let answer = |port: u16, flags: u8, ack: u32| Pkt::tcp(Ip::V4(SVC4, CTL4), 80, port, flags).seq(7).ack(ack).build();
        let syn_ack = packets::SYN | packets::ACK;
        // Anyone may send a SYN-ACK from the service's address: one that does not acknowledge
        // the probe's sequence number passes on and is not recorded.
        expect(dp, &answer(45_000, syn_ack, isn), TCX_NEXT, "passed");
        expect(dp, &answer(45_001, packets::RST | packets::ACK, 0), TCX_NEXT, "passed");
        assert_eq!(probes.get(&45_000, 0).expect("entry").tcp_flags, 0, "a wrong SYN-ACK is not an answer");
        assert_eq!(probes.get(&45_001, 0).expect("entry").tcp_flags, 0, "a wrong reset is not an answer");
        // The target's answers acknowledge it.
        expect(dp, &answer(45_000, syn_ack, isn + 1), TC_ACT_SHOT, "probe-answer");
        assert_eq!(probes.get(&45_000, 0).expect("entry").tcp_flags, syn_ack);
        expect(dp, &answer(45_001, packets::RST | packets::ACK, isn + 1), TC_ACT_SHOT, "probe-answer");
        assert_eq!(probes.get(&45_001, 0).expect("entry").tcp_flags, packets::RST | packets::ACK);
        // A recorded answer is not overwritten by a forged one.
        expect(dp, &answer(45_000, packets::RST | packets::ACK, 1), TCX_NEXT, "passed");
        assert_eq!(probes.get(&45_000, 0).expect("entry").tcp_flags, syn_ack);
    });
}

#[test]
fn tunnelled_segments_from_this_nodes_or_a_siblings_addresses_are_dropped() {
    with_datapath(|dp| {
        let other_sibling = Ipv4Addr::new(198, 18, 0, 3);
        for s in [IpAddr::V4(CTL4), IpAddr::V4(other_sibling), IpAddr::V6(CTL6)] {
            dp.add_sibling(s, "lo").expect("sibling");
        }
        dp.adopt((IpAddr::V4(ADOPTED4), 80), "lo", None, Some(1500)).expect("adopt v4");
        dp.adopt((IpAddr::V6(ADOPTED6), 80), "lo", None, Some(1500)).expect("adopt v6");
        let seg4 = |src: Ipv4Addr, flags: u8| packets::encap4(CTL4, TGT4, &Pkt::tcp(Ip::V4(src, ADOPTED4), 45_000, 80, flags).build());
        expect(dp, &seg4(CLIENT4, packets::ACK), TCX_NEXT, "decapsulated");
        // This node's addresses (the adopted one, the tunnel's destination, its own service),
        // another sibling's, loopback and "this network": forged.
        for src in [ADOPTED4, TGT4, SVC4, other_sibling, Ipv4Addr::LOCALHOST, Ipv4Addr::new(0, 1, 2, 3)] {
            expect(dp, &seg4(src, packets::SYN), TC_ACT_SHOT, "dropped-spoofed");
        }
        // The sending sibling's own address: its readiness probe (a SYN, then a reset) passes;
        // anything else from it would be a connection in its name.
        expect(dp, &seg4(CTL4, packets::SYN), TCX_NEXT, "decapsulated");
        expect(dp, &seg4(CTL4, packets::RST), TCX_NEXT, "decapsulated");
        expect(dp, &seg4(CTL4, packets::ACK), TC_ACT_SHOT, "dropped-spoofed");
        let seg6 = |src: Ipv6Addr, flags: u8| packets::encap6(CTL6, TGT6, &Pkt::tcp(Ip::V6(src, ADOPTED6), 45_000, 80, flags).build());
        expect(dp, &seg6(CLIENT6, packets::ACK), TCX_NEXT, "decapsulated");
        for src in [ADOPTED6, TGT6, SVC6, Ipv6Addr::LOCALHOST] {
            expect(dp, &seg6(src, packets::SYN), TC_ACT_SHOT, "dropped-spoofed");
        }
        expect(dp, &seg6(CTL6, packets::SYN), TCX_NEXT, "decapsulated");
        expect(dp, &seg6(CTL6, packets::ACK), TC_ACT_SHOT, "dropped-spoofed");
    });
}

/// A frozen flow has its packets dropped, both families, whether its client is steered or not
/// (a hand-over freezes its clients' connections before its rules go in); other ports of the
/// same clients are not; thawed, the flow is decided as before; a freeze nobody lifts ends by
/// itself.
#[test]
fn frozen_flows_are_dropped_until_thawed_or_their_freeze_ends() {
    with_datapath(|dp| {
        let svc4 = SocketAddr::new(IpAddr::V4(SVC4), 80);
        let svc6 = SocketAddr::new(IpAddr::V6(SVC6), 80);
        let flows = [(SocketAddr::new(IpAddr::V4(OTHER4), 4000), svc4), (SocketAddr::new(IpAddr::V4(CLIENT4), 4000), svc4), (SocketAddr::new(IpAddr::V6(CLIENT6), 4000), svc6)];
        dp.freeze(&flows, Duration::from_secs(60)).expect("freeze");
        assert_eq!(dp.frozen_count().expect("count"), 3);
        expect(dp, &ack4(OTHER4, 4000), TC_ACT_SHOT, "dropped-frozen");
        expect(dp, &ack4(CLIENT4, 4000), TC_ACT_SHOT, "dropped-frozen");
        expect(dp, &ack6(CLIENT6, 4000), TC_ACT_SHOT, "dropped-frozen");
        expect(dp, &ack4(OTHER4, 4001), TCX_NEXT, "passed-not-migrated");
        expect(dp, &ack4(CLIENT4, 4001), TC_ACT_REDIRECT, "forwarded-existing");
        dp.thaw(&flows[..2]).expect("thaw");
        expect(dp, &ack4(OTHER4, 4000), TCX_NEXT, "passed-not-migrated");
        expect(dp, &ack4(CLIENT4, 4000), TC_ACT_REDIRECT, "forwarded-existing");
        expect(dp, &ack6(CLIENT6, 4000), TC_ACT_SHOT, "dropped-frozen");
        dp.thaw(&flows[2..]).expect("thaw");
        assert_eq!(dp.frozen_count().expect("count"), 0);
        dp.thaw(&flows).expect("thawing flows that are not frozen changes nothing");
        expect(dp, &ack6(CLIENT6, 4000), TC_ACT_REDIRECT, "forwarded-existing");
        // Nobody thaws it: the freeze ends by itself.
        dp.freeze(&flows[1..2], Duration::from_millis(50)).expect("freeze");
        expect(dp, &ack4(CLIENT4, 4000), TC_ACT_SHOT, "dropped-frozen");
        std::thread::sleep(Duration::from_millis(60));
        expect(dp, &ack4(CLIENT4, 4000), TC_ACT_REDIRECT, "forwarded-existing");
    });
}

/// A volunteer giving connections back freezes them too, as they come out of the tunnel: a
/// tunnelled segment of a frozen flow is dropped (a packet the origin forwarded just before its
/// own freeze must not reach the socket being dumped), other ports of the client are not;
/// thawed, it is decapsulated again. Both families.
#[test]
fn tunnelled_segments_of_frozen_flows_are_dropped_until_thawed() {
    with_datapath(|dp| {
        dp.add_sibling(IpAddr::V4(CTL4), "lo").expect("sibling v4");
        dp.add_sibling(IpAddr::V6(CTL6), "lo").expect("sibling v6");
        dp.adopt((IpAddr::V4(ADOPTED4), 80), "lo", None, Some(1500)).expect("adopt v4");
        dp.adopt((IpAddr::V6(ADOPTED6), 80), "lo", None, Some(1500)).expect("adopt v6");
        let seg4 = |port: u16| packets::encap4(CTL4, TGT4, &Pkt::tcp(Ip::V4(CLIENT4, ADOPTED4), port, 80, packets::ACK).build());
        let seg6 = |port: u16| packets::encap6(CTL6, TGT6, &Pkt::tcp(Ip::V6(CLIENT6, ADOPTED6), port, 80, packets::ACK).build());
        let flows = [
            (SocketAddr::new(IpAddr::V4(CLIENT4), 45_000), SocketAddr::new(IpAddr::V4(ADOPTED4), 80)),
            (SocketAddr::new(IpAddr::V6(CLIENT6), 45_000), SocketAddr::new(IpAddr::V6(ADOPTED6), 80)),
        ];
        dp.freeze(&flows, Duration::from_secs(60)).expect("freeze");
        expect(dp, &seg4(45_000), TC_ACT_SHOT, "dropped-frozen");
        expect(dp, &seg6(45_000), TC_ACT_SHOT, "dropped-frozen");
        expect(dp, &seg4(45_001), TCX_NEXT, "decapsulated");
        expect(dp, &seg6(45_001), TCX_NEXT, "decapsulated");
        dp.thaw(&flows).expect("thaw");
        expect(dp, &seg4(45_000), TCX_NEXT, "decapsulated");
        expect(dp, &seg6(45_000), TCX_NEXT, "decapsulated");
    });
}

/// An origin's own service whose connections may move live announces an MSS that fits the
/// tunnel in its SYN-ACKs; without that, its SYN-ACKs are untouched.
#[test]
fn syn_acks_of_services_whose_connections_move_live_get_their_mss_clamped_on_egress() {
    with_datapath(|dp| {
        let own4 = Pkt::tcp(Ip::V4(SVC4, CLIENT4), 80, 4000, packets::SYN | packets::ACK).mss(1460).build();
        let own6 = Pkt::tcp(Ip::V6(SVC6, CLIENT6), 80, 4000, packets::SYN | packets::ACK).mss(1440).build();
        assert_eq!(dp.test_run(programs::EGRESS, &own4, 1).expect("run egress").data_out, own4, "not without live moves");
        dp.set_live_moves((IpAddr::V4(SVC4), 80), true).expect("live moves v4");
        dp.set_live_moves((IpAddr::V6(SVC6), 80), true).expect("live moves v6");
        let before = dp.stats().expect("stats").get("clamped-syn-ack");
        let run = dp.test_run(programs::EGRESS, &own4, 1).expect("run egress");
        assert_eq!(packets::tcp_mss(&run.data_out[14..]), Some(1440), "clamped to 1500 - 60");
        assert!(packets::tcp_checksum_ok(&run.data_out[14..]), "checksum fixed");
        let run = dp.test_run(programs::EGRESS, &own6, 1).expect("run egress");
        assert_eq!(packets::tcp_mss(&run.data_out[14..]), Some(1400), "clamped to 1500 - 100");
        assert_eq!(dp.stats().expect("stats").get("clamped-syn-ack"), before + 2);
        // The classifier still steers the service as before.
        expect(dp, &syn4(OTHER4, 4000), TCX_NEXT, "passed-not-migrated");
        dp.set_live_moves((IpAddr::V4(SVC4), 80), false).expect("off");
        assert_eq!(dp.test_run(programs::EGRESS, &own4, 1).expect("run egress").data_out, own4, "off again");
    });
}
