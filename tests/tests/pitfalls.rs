//! The production pitfalls of DSR / IP-in-IP balancers, each with a real-TCP test in network
//! namespaces: strangers' tunnels, SYN cookies, ICMP for flows living on the target, ports the
//! origin holds in `TIME_WAIT`, upgrades under load, bad input, and cleanup.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use redirector_tests::{
    Client, Server, Topology,
    app::try_connect_from,
    net::{SERVICE4, SERVICE6, Tap, client4, client6, mac_string, netns_exists, send_raw4},
    packets::{self, Ip, Pkt},
    require_root, wait_until,
};

fn svc4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(SERVICE4), port)
}

#[test]
fn tunnelled_packets_from_strangers_are_dropped() {
    if !require_root() {
        return;
    }
    let t = Topology::new(10);
    let (_a, b) = t.steered_v4(80);
    let stranger = client4(9);
    let syn = Pkt::tcp(Ip::V4(stranger, SERVICE4), 40_000, 80, packets::SYN).build_ip();
    let (dropped, decap) = (t.counter(&t.b, "dropped-bad"), t.counter(&t.b, "decapsulated"));
    // From the client namespace, outer source 198.18.1.9: not a sibling of B.
    send_raw4(&t.client.ns, libc::IPPROTO_IPIP, stranger, t.b.v4[0], syn.clone());
    wait_until("B to count the dropped tunnel", Duration::from_secs(5), || t.counter(&t.b, "dropped-bad") == dropped + 1);
    assert_eq!(t.counter(&t.b, "decapsulated"), decap, "nothing from the stranger was decapsulated");
    assert_eq!(t.counter(&t.b, "sk-assigned"), 0, "nothing reached B's listener");
    // The very same packet from A's control address (a sibling) is decapsulated and reaches B's
    // listener: the drop above was about the sender, not the packet.
    let assigned = t.counter(&t.b, "sk-assigned");
    send_raw4(&t.a.ns, libc::IPPROTO_IPIP, t.a.v4[0], t.b.v4[0], syn);
    wait_until("B to decapsulate the sibling's tunnel", Duration::from_secs(5), || t.counter(&t.b, "decapsulated") == decap + 1);
    wait_until("B's listener to get the SYN", Duration::from_secs(5), || t.counter(&t.b, "sk-assigned") == assigned + 1);
    assert_eq!(t.counter(&t.b, "dropped-bad"), dropped + 1);
    assert_eq!(b.accepted(), 0, "a lone SYN never completes a connection");
}

#[test]
fn syn_cookie_handshakes_of_the_origin_stay_on_the_origin() {
    if !require_root() {
        return;
    }
    let t = Topology::new(10);
    let _servers = t.steered_v4(80);
    // A answers every SYN with a cookie (as under a SYN flood): no request socket exists when
    // the handshake's ACK arrives. While the client's rule drains, A keeps its new SYNs; the
    // ACK then finds only A's listener and must stay because its cookie is valid.
    t.a.sysctl("net.ipv4.tcp_syncookies", "2");
    let c5 = client4(5);
    t.migrate(&c5.to_string(), IpAddr::V4(t.b.v4[0]));
    t.redirector_ok(&t.a, &["rule", "del", &c5.to_string(), "--drain", "30"]);
    let before = t.counter(&t.a, "kept-syncookie");
    for i in 0..3 {
        let mut c = Client::connect(&t.client.ns, IpAddr::V4(c5), svc4(80));
        assert_eq!(c.who(), "A", "connection {i}: the SYN-cookie handshake completes on A");
    }
    assert!(t.counter(&t.a, "kept-syncookie") >= before + 3, "each cookie ACK was recognised");
}

#[test]
fn ipv6_syn_cookie_handshakes_of_the_origin_stay_on_the_origin() {
    if !require_root() {
        return;
    }
    let t = Topology::new(10);
    let svc6 = SocketAddr::new(IpAddr::V6(SERVICE6), 80);
    let _a = redirector_tests::Server::start(&t.a.ns, "A", svc6);
    let _b = redirector_tests::Server::start(&t.b.ns, "B", SocketAddr::new(IpAddr::V6(t.b.v6[0]), 80));
    let _b4 = redirector_tests::Server::start(&t.b.ns, "B", SocketAddr::new(IpAddr::V4(t.b.v4[0]), 80));
    t.steer_a_to_b(80, 80);
    // net.ipv4.tcp_syncookies governs IPv6 too.
    t.a.sysctl("net.ipv4.tcp_syncookies", "2");
    let c5 = client6(5);
    t.migrate(&c5.to_string(), IpAddr::V6(t.b.v6[0]));
    assert_eq!(Client::connect(&t.client.ns, IpAddr::V6(c5), svc6).who(), "B");
    t.redirector_ok(&t.a, &["rule", "del", &c5.to_string(), "--drain", "30"]);
    let before = t.counter(&t.a, "kept-syncookie");
    for i in 0..3 {
        let mut c = Client::connect(&t.client.ns, IpAddr::V6(c5), svc6);
        assert_eq!(c.who(), "A", "connection {i}: the IPv6 SYN-cookie handshake completes on A");
    }
    assert!(t.counter(&t.a, "kept-syncookie") >= before + 3, "each IPv6 cookie ACK was recognised");
}

/// TCP resets sent by namespace `ns` (`OutRsts` of /proc/net/snmp).
fn tcp_out_rsts(ns: &str) -> u64 {
    let snmp = redirector_tests::in_netns(ns, || std::fs::read_to_string("/proc/net/snmp").expect("snmp"));
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (names, values) = (tcp[0].split_whitespace(), tcp[1].split_whitespace());
    names.zip(values).find(|(n, _)| *n == "OutRsts").and_then(|(_, v)| v.parse().ok()).expect("OutRsts")
}

/// B's next sequence number on `client`'s connection, read from the client side in repair mode.
fn peer_next_seq(client: &Client) -> u32 {
    let fd = client.raw_fd();
    let set = |opt: i32, v: i32| {
        // SAFETY: setsockopt with an int on a valid socket.
        let rc = unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, opt, (&raw const v).cast(), 4) };
        assert_eq!(rc, 0, "setsockopt {opt}: {}", std::io::Error::last_os_error());
    };
    set(libc::TCP_REPAIR, 1);
    set(libc::TCP_REPAIR_QUEUE, 1); // TCP_RECV_QUEUE
    let mut seq: u32 = 0;
    let mut len: libc::socklen_t = 4;
    // SAFETY: getsockopt into a u32 of 4 bytes.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, (&raw mut seq).cast(), &raw mut len) };
    assert_eq!(rc, 0, "TCP_QUEUE_SEQ: {}", std::io::Error::last_os_error());
    set(libc::TCP_REPAIR, 0);
    seq
}

#[test]
fn icmp_fragmentation_needed_for_flows_on_the_target_reaches_the_target() {
    if !require_root() {
        return;
    }
    let t = Topology::new(10);
    let _servers = t.steered_v4(80);
    let c5 = client4(5);
    t.migrate(&c5.to_string(), IpAddr::V4(t.b.v4[0]));
    let mut c = Client::connect(&t.client.ns, IpAddr::V4(c5), svc4(80));
    assert_eq!(c.who(), "B");
    let cport = c.local().port();
    let seq = peer_next_seq(&c);
    // A router on the way to the client says "fragmentation needed, MTU 1300" about B's reply
    // (source: A's address); it sends the error to A's address.
    let router = Ipv4Addr::new(198, 18, 1, 200);
    let quoted = Pkt::tcp(Ip::V4(SERVICE4, c5), 80, cport, packets::ACK).seq(seq).build_ip();
    // The ICMP message alone: the raw socket adds the IP header.
    let icmp = packets::icmp4_frag_needed(router, SERVICE4, &quoted, 1300)[34..].to_vec();
    t.client.ip(&["addr", "add", &format!("{router}/16"), "dev", "eth0"]);
    let relayed = t.counter(&t.a, "icmp-relayed");
    send_raw4(&t.client.ns, libc::IPPROTO_ICMP, router, SERVICE4, icmp);
    wait_until("A to relay the ICMP error", Duration::from_secs(5), || t.counter(&t.a, "icmp-relayed") == relayed + 1);
    // B's socket for the flow learnt the smaller path MTU.
    wait_until("B's connection to lower its path MTU", Duration::from_secs(5), || {
        let ss = t.b.exec(&["ss", "-tin", "dst", &c5.to_string()]);
        ss.contains("pmtu:1300")
    });
    assert_eq!(c.who(), "B", "the connection keeps working");
}

/// A topology where A serves its service (both families), B serves the same port on its own
/// addresses, and A steers the service with B ready to serve it.
fn steered_both(t: &Topology) -> [Server; 4] {
    let servers = [
        Server::start(&t.a.ns, "A", svc4(80)),
        Server::start(&t.a.ns, "A", SocketAddr::new(IpAddr::V6(SERVICE6), 80)),
        Server::start(&t.b.ns, "B", SocketAddr::new(IpAddr::V4(t.b.v4[0]), 80)),
        Server::start(&t.b.ns, "B", SocketAddr::new(IpAddr::V6(t.b.v6[0]), 80)),
    ];
    t.steer_a_to_b(80, 80);
    servers
}

/// Whether `ss` on `host` lists a TCP socket in `state` from `local` to `peer`.
fn has_socket(host: &redirector_tests::Host, state: &str, local: SocketAddr, peer: SocketAddr) -> bool {
    let (local, peer) = (local.to_string(), peer.to_string());
    host.exec(&["ss", "-Htan", "state", state]).lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.windows(2).any(|w| w[0] == local && w[1] == peer)
    })
}

/// A connection from `src` (a fixed port) to A's service that A's server closes first, as an
/// HTTP/1.0 or `Connection: close` server does: once this returns, A holds its 4-tuple in
/// `TIME_WAIT` and the client's own socket is gone (the client may use the port again).
fn ended_by_the_origin(t: &Topology, src: SocketAddr, svc: SocketAddr) {
    let mut c = try_connect_from(&t.client.ns, src, svc).unwrap_or_else(|e| panic!("connect {src} -> {svc}: {e}"));
    assert_eq!(c.who(), "A", "before the rule the client is served by A");
    c.bye().expect("A's server closes the connection");
    drop(c);
    wait_until("A to hold the connection in TIME_WAIT", Duration::from_secs(5), || has_socket(&t.a, "time-wait", svc, src));
    wait_until("the client's socket to close", Duration::from_secs(5), || !has_socket(&t.client, "all", src, svc));
}

#[test]
fn a_moved_client_reusing_a_port_the_origin_holds_in_time_wait_is_served_by_the_target() {
    if !require_root() {
        return;
    }
    let t = Topology::new(2);
    let _servers = steered_both(&t);
    for (client, target, svc) in
        [(IpAddr::V4(client4(1)), IpAddr::V4(t.b.v4[0]), svc4(80)), (IpAddr::V6(client6(1)), IpAddr::V6(t.b.v6[0]), SocketAddr::new(IpAddr::V6(SERVICE6), 80))]
    {
        // The client's kernel picks the same source port again, as it may within A's minute of
        // TIME_WAIT.
        let src = SocketAddr::new(client, 40_080);
        ended_by_the_origin(&t, src, svc);
        t.migrate(&client.to_string(), target);
        let (passed, kept) = (t.counter(&t.a, "forwarded-time-wait"), t.counter(&t.a, "kept-local"));
        let mut c = try_connect_from(&t.client.ns, src, svc).unwrap_or_else(|e| panic!("connect {src} -> {svc} again: {e}"));
        assert_eq!(c.local(), src, "the new connection uses the old one's ports");
        // The handshake completes through B either way (SYN steered, SYN-ACK direct); the
        // ACK and the request must reach B too, not A's TIME_WAIT socket.
        c.set_read_timeout(Duration::from_secs(2)).expect("read timeout");
        let (name, _) = c.try_who().unwrap_or_else(|e| panic!("{src}: no answer within 2 s from the port A holds in TIME_WAIT: {e}"));
        assert_eq!(name, "B", "{src}: the moved client is served by B");
        assert_eq!(c.who(), "B", "{src}: and stays there");
        assert!(t.counter(&t.a, "forwarded-time-wait") >= passed + 2, "{src}: A counted the ACK and the request it passed on");
        assert_eq!(t.counter(&t.a, "kept-local"), kept, "{src}: A kept nothing of the new connection");
        assert!(has_socket(&t.a, "time-wait", svc, src), "{src}: A's TIME_WAIT socket was passed by, not ended");
    }
}

#[test]
fn a_late_fin_the_origin_holds_in_time_wait_is_reset_by_the_target() {
    if !require_root() {
        return;
    }
    let t = Topology::new(2);
    let _servers = steered_both(&t);
    let (a_mac, b_mac) = (t.a.mac(), t.b.mac());
    for (client, target, svc) in
        [(IpAddr::V4(client4(2)), IpAddr::V4(t.b.v4[0]), svc4(80)), (IpAddr::V6(client6(2)), IpAddr::V6(t.b.v6[0]), SocketAddr::new(IpAddr::V6(SERVICE6), 80))]
    {
        let src = SocketAddr::new(client, 40_081);
        let tap = Tap::open(&t.client.ns, "eth0");
        ended_by_the_origin(&t, src, svc);
        // The client's FIN of that connection, as it left.
        let fin = tap
            .next(Duration::ZERO, |p| p.outgoing && packets::tcp_segment(&p.ip).is_some_and(|s| s.src == src && s.dst == svc && s.flags & packets::FIN != 0))
            .and_then(|p| packets::tcp_segment(&p.ip))
            .unwrap_or_else(|| panic!("{src}: the client's FIN was not seen"));
        // A's last ACK of that connection, already received: not an answer to what follows.
        tap.drain();
        t.migrate(&client.to_string(), target);
        // A retransmission of that FIN, as the client sends while its socket waits in LAST_ACK
        // for an ACK that got lost.
        let ip = match (client, svc.ip()) {
            (IpAddr::V4(c), IpAddr::V4(s)) => Ip::V4(c, s),
            (IpAddr::V6(c), IpAddr::V6(s)) => Ip::V6(c, s),
            _ => unreachable!("one family"),
        };
        let again = Pkt::tcp(ip, src.port(), svc.port(), packets::FIN | packets::ACK).seq(fin.seq).ack(fin.ack).build_ip();
        let (passed, kept, decap) = (t.counter(&t.a, "forwarded-time-wait"), t.counter(&t.a, "kept-local"), t.counter(&t.b, "decapsulated"));
        tap.send(&again, &a_mac);
        let answer = tap
            .next(Duration::from_secs(3), |p| !p.outgoing && packets::tcp_segment(&p.ip).is_some_and(|s| s.src == svc && s.dst == src))
            .unwrap_or_else(|| panic!("{src}: no answer to the late FIN within 3 s"));
        let seg = packets::tcp_segment(&answer.ip).expect("a TCP segment");
        let from = mac_string(answer.from_mac);
        assert!(seg.flags & packets::RST != 0 && from == b_mac, "{src}: the late FIN draws a reset from B ({b_mac}); got flags {:#04x} from {from} (A is {a_mac})", seg.flags);
        assert_eq!(seg.seq, fin.ack, "{src}: the reset is in the old socket's window: it would end that socket at once");
        assert_eq!(t.counter(&t.a, "forwarded-time-wait"), passed + 1, "{src}: A passed the late FIN to B");
        assert_eq!(t.counter(&t.a, "kept-local"), kept, "{src}: A kept nothing");
        assert_eq!(t.counter(&t.b, "decapsulated"), decap + 1, "{src}: B took it in");
        assert!(has_socket(&t.a, "time-wait", svc, src), "{src}: A's TIME_WAIT socket never saw it");
    }
}

#[test]
fn programs_are_replaced_atomically_during_a_transfer() {
    if !require_root() {
        return;
    }
    let t = Topology::new(10);
    let _servers = t.steered_v4(80);
    let c5 = client4(5);
    t.migrate(&c5.to_string(), IpAddr::V4(t.b.v4[0]));
    let done = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU32::new(0));
    let t = Arc::new(t);
    let swapper = {
        let (t, done, swaps) = (t.clone(), done.clone(), swaps.clone());
        std::thread::spawn(move || {
            // Bounded: at most 200 swaps.
            for _ in 0..200 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let out = t.redirector_ok(&t.a, &["attach", "--dev", "eth0", "--replace"]);
                assert!(out.contains("replaced 1"), "the classifier was replaced: {out}");
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The client reads slowly, so the ACKs cross A's classifier throughout the swaps.
    let mut c = Client::connect(&t.client.ns, IpAddr::V4(c5), svc4(80));
    let resets = tcp_out_rsts(&t.a.ns);
    let intact = c.download_paced(64 << 20, 5, Duration::from_millis(1));
    done.store(true, Ordering::Relaxed);
    swapper.join().expect("swapper");
    assert!(intact, "the 64 MiB download survived the program swaps intact");
    // A packet of the flow living on B that A's stack saw during a swap (decided differently)
    // would have drawn a reset from A; retransmissions would hide it from the transfer.
    assert_eq!(tcp_out_rsts(&t.a.ns), resets, "A sent no reset: every packet was steered during the swaps");
    assert!(swaps.load(Ordering::Relaxed) >= 3, "programs were swapped during the transfer ({})", swaps.load(Ordering::Relaxed));
    assert_eq!(c.who(), "B");
    assert_eq!(t.counter(&t.a, "error-forward"), 0);
}

#[test]
fn bad_input_gives_one_clear_line_and_installs_nothing() {
    if !require_root() {
        return;
    }
    let t = Topology::new(2);
    let one_line_error = |args: &[&str], code: i32, needle: &str| {
        let out = t.redirector(&t.a, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: exit code {code} expected; stderr {err:?}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{args:?}: expected an error with {needle:?}, got {err:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line, got {err:?}");
    };
    // Nothing set up yet: no command but the set-up ones may create an instance.
    let instance = t.bpffs.join("redirector").join(&t.a.ns);
    one_line_error(&["rule", "list"], 1, "no redirector instance");
    one_line_error(&["stats"], 1, "no redirector instance");
    one_line_error(&["rule", "add", "198.18.1.5", "--to", "198.18.0.2"], 1, "no redirector instance");
    one_line_error(&["teardown"], 1, "no redirector instance");
    one_line_error(&["service", "add", "198.18.0.10:80", "--dev", "nosuch0"], 1, "interface nosuch0 not found");
    assert!(!instance.exists(), "failed commands left no instance behind at {}", instance.display());
    // Usage errors: exit code 2, one line.
    one_line_error(&["rule", "add", "198.18.1.0/33", "--to", "198.18.0.2"], 2, "198.18.1.0/33");
    one_line_error(&["rule", "add", "198.18.1.5/24", "--to", "198.18.0.2"], 2, "host bits");
    one_line_error(&["rule", "add", "not-an-ip", "--to", "198.18.0.2"], 2, "not-an-ip");
    one_line_error(&["rule", "add", "198.18.1.5"], 2, "--to");
    // With an instance, errors change nothing.
    t.redirector_ok(&t.a, &["service", "add", "[2001:db8::10]:80", "--dev", "eth0"]);
    one_line_error(&["rule", "add", "198.18.1.5", "--to", "2001:db8::2"], 1, "different families");
    one_line_error(&["rule", "add", "198.18.1.5", "--to", "198.18.0.2"], 1, "no steered IPv4 service");
    one_line_error(&["rule", "del", "198.18.1.5"], 1, "no rule for 198.18.1.5/32");
    one_line_error(&["adopt", "add", "198.18.0.10:80", "--dev", "eth0", "--listener", "198.18.0.10:80"], 1, "198.18.0.10");
    let out = t.redirector(&t.b, &["--netns", "no-such-netns", "rule", "list"]);
    assert!(!out.status.success());
    let list = t.redirector_ok(&t.a, &["rule", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).expect("rule list JSON");
    assert_eq!(v["rules"].as_array().map(Vec::len), Some(0), "nothing half-installed: {list}");
    let services = t.redirector_ok(&t.a, &["service", "list", "--json"]);
    assert!(!services.contains("198.18.0.10\""), "no service half-installed: {services}");
    let adopted = t.redirector_ok(&t.a, &["adopt", "list", "--json"]);
    assert!(!adopted.contains("198.18.0.10"), "no adoption half-installed: {adopted}");
    // (A has 198.18.0.10 on eth0 itself; an adoption would add it on lo.)
    let local = t.a.ip(&["route", "show", "table", "local", "dev", "lo"]);
    assert!(!local.contains("198.18.0.10"), "no route half-installed: {local}");
}

#[test]
fn an_instance_of_another_layout_is_refused_not_reused() {
    if !require_root() {
        return;
    }
    let t = Topology::new(2);
    // An instance whose SERVICES map has other value sizes (another version's layout).
    let dir = t.bpffs.join("redirector").join(&t.a.ns);
    std::fs::create_dir_all(&dir).expect("instance dir");
    drop(pin_map(&dir.join("SERVICES"), BPF_MAP_TYPE_HASH, 20, 8, 16));
    let out = t.redirector(&t.a, &["service", "add", "198.18.0.10:80", "--dev", "eth0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an incompatible instance must not be used");
    assert!(err.contains("incompatible version") && err.contains("SERVICES") && err.contains("teardown --force"), "says what and what to do: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 1, "nothing was added to the old instance");
    t.redirector_ok(&t.a, &["teardown", "--force"]);
    assert!(!dir.exists(), "the old instance is gone");
    t.redirector_ok(&t.a, &["service", "add", "198.18.0.10:80", "--dev", "eth0"]);
}

#[test]
fn an_instance_of_the_counters_layout_before_counters_extra_is_upgraded_in_place() {
    if !require_root() {
        return;
    }
    let t = Topology::new(2);
    // An instance of the version before `COUNTERS_EXTRA`: COUNTERS with its 20 per-CPU
    // entries, and `sk-no-listener` (the last of them) at 3 on every CPU.
    let dir = t.bpffs.join("redirector").join(&t.a.ns);
    std::fs::create_dir_all(&dir).expect("instance dir");
    let counters = pin_map(&dir.join("COUNTERS"), BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 20);
    let cpus = possible_cpus();
    update_elem(&counters, &19u32.to_ne_bytes(), &vec![3u64; cpus]);
    drop(counters);
    t.redirector_ok(&t.a, &["service", "add", "198.18.0.10:80", "--dev", "eth0"]);
    assert_eq!(t.counter(&t.a, "sk-no-listener"), 3 * cpus as u64, "the pinned counters were kept, with their counts");
    assert_eq!(t.counter(&t.a, "forwarded-time-wait"), 0, "the new counter is there");
    assert!(dir.join("COUNTERS_EXTRA").exists(), "its map was added to the instance");
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;

/// Creates a map of type `ty` and pins it at `path` (raw `bpf()` calls).
fn pin_map(path: &std::path::Path, ty: u32, key_size: u32, value_size: u32, max_entries: u32) -> std::os::fd::OwnedFd {
    let mut attr = [0u32; 32];
    attr[0] = ty;
    attr[1] = key_size;
    attr[2] = value_size;
    attr[3] = max_entries;
    // SAFETY: a valid, zero-padded bpf_attr for BPF_MAP_CREATE.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    assert!(fd >= 0, "creating a map: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel returned a new fd we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(i32::try_from(fd).expect("fd")) };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut pin = [0u64; 2];
    pin[0] = c.as_ptr() as u64;
    pin[1] = u64::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).expect("fd");
    // SAFETY: a valid bpf_attr for BPF_OBJ_PIN (cmd 6); the path outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_mut_ptr(), std::mem::size_of_val(&pin)) };
    assert_eq!(rc, 0, "pinning {}: {}", path.display(), std::io::Error::last_os_error());
    fd
}

/// `BPF_MAP_UPDATE_ELEM` of `key` with `value` (for a per-CPU map: one value per possible CPU).
fn update_elem(map: &std::os::fd::OwnedFd, key: &[u8], value: &[u64]) {
    // union bpf_attr: map_fd, (pad), key, value, flags.
    let mut attr = [0u64; 4];
    attr[0] = u64::try_from(std::os::fd::AsRawFd::as_raw_fd(map)).expect("fd");
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_ptr() as u64;
    // SAFETY: a valid bpf_attr for BPF_MAP_UPDATE_ELEM (cmd 2); key and value outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 2, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    assert_eq!(rc, 0, "updating a map: {}", std::io::Error::last_os_error());
}

/// The number of possible CPUs (the values of a per-CPU map entry), from
/// `/sys/devices/system/cpu/possible` (`0-N`).
fn possible_cpus() -> usize {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    s.trim().split(',').map(|r| r.split_once('-').map_or(1, |(a, b)| b.parse::<usize>().expect("cpu") - a.parse::<usize>().expect("cpu") + 1)).sum()
}

#[test]
fn topologies_are_removed_even_when_a_test_panics() {
    if !require_root() {
        return;
    }
    let names = std::sync::Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(|| {
        let t = Topology::new(2);
        names.lock().expect("lock").extend([t.switch.clone(), t.a.ns.clone(), t.b.ns.clone(), t.c.ns.clone(), t.client.ns.clone()]);
        assert!(netns_exists(&t.a.ns));
        panic!("a failing test");
    });
    assert!(r.is_err());
    for ns in names.lock().expect("lock").iter() {
        assert!(!netns_exists(ns), "namespace {ns} was removed after the panic");
    }
}
