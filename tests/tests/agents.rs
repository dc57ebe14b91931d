//! Agents on three servers negotiating by themselves over mutual TLS, with real connections
//! from a client namespace with many client addresses.

use std::{
    collections::{BTreeSet, HashMap},
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use redirector::peer::{Answer, Frame, MovedClient, PROTOCOL_VERSION, Request};
use redirector_tests::{
    Client,
    agents::{Cluster, Sampler, max_load, migrated, open, served_by, wait_log, wait_status},
    net::{SERVICE4, SERVICE4_B, SERVICE4_C, client4, client6, send_raw4_burst},
    packets::{self, Ip, Pkt},
    peer::{TlsStream, connect_as, hello, read_answer, read_msg, send, send_frame, tls_connect},
    require_root,
};

fn svc(ip: std::net::Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), 80)
}

fn adopted_by(v: &serde_json::Value) -> BTreeSet<String> {
    redirector_tests::agents::adopted(v).into_iter().collect()
}

#[test]
fn an_overloaded_server_sheds_clients_to_its_siblings_by_itself() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(60, &[("a", 30, 20), ("b", 20, 10), ("c", 20, 10)]);
    // B and C have clients of their own: their load counts against what they can offer, and
    // those clients must not notice anything.
    let b_own = open(&c, 46..=50, svc(SERVICE4_B));
    let c_own = open(&c, 51..=55, svc(SERVICE4_C));
    for n in ["b", "c"] {
        wait_status(&c.sock(n), 10, &format!("{n}'s own load counted"), |v| v["load"] == 5);
    }
    let sampler = Sampler::start(&c, &["a", "b", "c"]);
    // 45 clients with one connection each drive A over its high watermark (30); B and C have
    // room for 15 each.
    let conns = open(&c, 1..=45, svc(SERVICE4));
    assert_eq!(served_by(&conns).get("A"), Some(&45), "before shedding A serves everyone");
    let a = wait_status(&c.sock("a"), 30, "A to move clients under its low watermark", |v| migrated(v).len() >= 25);
    let moved = migrated(&a);
    let to_b = moved.iter().filter(|m| m.1 == "b").count();
    let to_c = moved.iter().filter(|m| m.1 == "c").count();
    assert!(to_b > 0 && to_c > 0, "A split its clients over both volunteers: b {to_b}, c {to_c}");
    assert!(to_b <= 15 && to_c <= 15, "no volunteer got more than its room: b {to_b}, c {to_c}");
    // The clients reconnect (as a browser would): moved ones reach their volunteer.
    let where_moved: HashMap<String, String> = moved.into_iter().collect();
    drop(conns);
    std::thread::sleep(Duration::from_millis(300));
    let conns = open(&c, 1..=45, svc(SERVICE4));
    for (i, _, who) in &conns {
        let expected = where_moved.get(&client4(*i).to_string()).map_or("A".to_string(), |n| n.to_uppercase());
        assert_eq!(*who, expected, "client {} is served by {expected}", client4(*i));
    }
    wait_status(&c.sock("a"), 20, "A's load under its low watermark", |v| v["load"].as_u64().is_some_and(|l| l <= 20));
    // B's and C's own clients were not affected: same connections, new ones, same servers.
    // Each open one closes before its client connects again: two at once would count one more
    // against the volunteer's watermark than it has clients (B at 21 with all 15 it had room
    // for, a failed CI run).
    for (own, name) in [(b_own, "B"), (c_own, "C")] {
        for (i, mut cl, _) in own {
            assert_eq!(cl.who(), name, "{}'s open connection to {name} still works", client4(i));
            let peer = cl.peer();
            drop(cl);
            let mut again = Client::connect(&c.t.client.ns, IpAddr::V4(client4(i)), peer);
            assert_eq!(again.who(), name, "{}'s new connection is still served by {name}", client4(i));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let samples = sampler.stop();
    for n in ["b", "c"] {
        let (max, count) = max_load(&samples[n]);
        assert!(count > 10 && max <= 20, "{n} never exceeded its high watermark (20): max {max} in {count} samples");
        for v in &samples[n] {
            let committed = v["load"].as_u64().unwrap_or(0) + v["promised"].as_u64().unwrap_or(0);
            assert!(committed <= 20, "{n} never promised past its high watermark: {v}");
            assert!(migrated(v).is_empty(), "{n} never shed (it stayed under its high watermark): {v}");
        }
        let v = c.status(n);
        let expected: BTreeSet<String> = where_moved.iter().filter(|(_, to)| *to == n).map(|(cl, _)| cl.clone()).collect();
        assert_eq!(adopted_by(&v), expected, "{n} lists exactly the clients it adopted");
    }
    let (a_log, b_log) = (c.log("a"), c.log("b"));
    for line in ["over the high watermark: asking siblings for help", "picked the largest clients to move", "offer taken", "hand-over committed", "client moved"] {
        assert!(a_log.contains(line), "A's log says {line:?}:\n{a_log}");
    }
    assert!(b_log.contains("offering help") && b_log.contains("adopted clients"), "B's log says why it helped:\n{b_log}");
}

#[test]
fn two_overloaded_servers_cannot_overbook_one_volunteer() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(70, &[("a", 20, 10), ("b", 20, 10), ("c", 20, 10)]);
    let sampler = Sampler::start(&c, &["b"]);
    // A and C cross their high watermark at the same moment (their clients connect in
    // parallel); only B has room, for 20 connections in all, and both ask it.
    let (a_conns, c_conns) = std::thread::scope(|s| {
        let a = s.spawn(|| open(&c, 1..=30, svc(SERVICE4)));
        let cc = s.spawn(|| open(&c, 31..=60, svc(SERVICE4_C)));
        (a.join().expect("A's clients"), cc.join().expect("C's clients"))
    });
    wait_status(&c.sock("b"), 30, "B to adopt clients", |v| !redirector_tests::agents::adopted(v).is_empty());
    // Give both origins time to ask again and again.
    std::thread::sleep(Duration::from_secs(3));
    let b_log = c.log("b");
    assert!(
        b_log.lines().any(|l| l.contains("origin=a") && (l.contains("offering") || l.contains("declining")))
            && b_log.lines().any(|l| l.contains("origin=c") && (l.contains("offering") || l.contains("declining"))),
        "both origins asked B:\n{b_log}"
    );
    let to_b = |n: &str| migrated(&c.status(n)).iter().filter(|m| m.1 == "b").count();
    let total = to_b("a") + to_b("c");
    assert!(total <= 20, "B was promised at most its room of 20 connections, got {total} clients (a {}, c {})", to_b("a"), to_b("c"));
    // Everyone reconnects: the moved clients land on B.
    drop(a_conns);
    drop(c_conns);
    std::thread::sleep(Duration::from_millis(300));
    let a2 = open(&c, 1..=30, svc(SERVICE4));
    let c2 = open(&c, 31..=60, svc(SERVICE4_C));
    let on_b = served_by(&a2).get("B").copied().unwrap_or(0) + served_by(&c2).get("B").copied().unwrap_or(0);
    assert_eq!(on_b, total, "every client moved to B reconnected to B");
    std::thread::sleep(Duration::from_millis(500));
    let samples = sampler.stop();
    let samples = &samples["b"];
    let (max, n) = max_load(samples);
    assert!(n > 20 && max <= 20, "B's load never exceeded its high watermark (20), during and after the moves: max {max} in {n} samples");
    for v in samples {
        let adopted = redirector_tests::agents::adopted(v).len();
        let committed = v["load"].as_u64().unwrap_or(0) + v["promised"].as_u64().unwrap_or(0);
        assert!(adopted <= 20 && committed <= 20, "B never took more than its room: {adopted} adopted, load + promised {committed}: {v}");
    }
}

#[test]
fn dual_stack_clients_move_over_the_control_addresses_of_their_own_family() {
    if !require_root() {
        return;
    }
    let c = Cluster::dual_stack(40, &[("a", 20, 10), ("b", 100, 80)]);
    let svc6 = redirector_tests::agents::service6("a");
    // 15 IPv4 and 15 IPv6 clients of A with one connection each: A sheds 20, of both
    // families (the IPv4 ones sort first), to B in one hand-over.
    let v4 = open(&c, 1..=15, svc(SERVICE4));
    let v6: Vec<(u16, Client)> = (1..=15).map(|i| (i, Client::connect(&c.t.client.ns, IpAddr::V6(client6(i)), svc6))).collect();
    let a = wait_status(&c.sock("a"), 30, "A to move 20 clients", |v| migrated(v).len() >= 20);
    let moved: BTreeSet<String> = migrated(&a).into_iter().map(|m| m.0).collect();
    assert!(moved.iter().any(|m| m.contains(':')) && moved.iter().any(|m| m.contains('.')), "clients of both families moved: {moved:?}");
    // B accepts A's tunnels from both of A's control addresses and serves both services.
    let siblings = c.t.redirector_ok(&c.t.b, &["sibling", "list", "--json"]);
    for a_ctl in [c.t.a.v4[0].to_string(), c.t.a.v6[0].to_string()] {
        assert!(siblings.contains(&a_ctl), "B accepts tunnels from {a_ctl}: {siblings}");
    }
    let adopted = c.t.redirector_ok(&c.t.b, &["adopt", "list", "--json"]);
    assert!(adopted.contains("198.18.0.10:80") && adopted.contains("[2001:db8::10]:80"), "B serves both of A's services: {adopted}");
    // The clients reconnect: each moved one, of either family, is served by B.
    drop(v4);
    drop(v6);
    std::thread::sleep(Duration::from_millis(300));
    for i in 1..=15 {
        for (addr, dst) in [(IpAddr::V4(client4(i)), svc(SERVICE4)), (IpAddr::V6(client6(i)), svc6)] {
            let mut cl = Client::connect(&c.t.client.ns, addr, dst);
            let expected = if moved.contains(&addr.to_string()) { "B" } else { "A" };
            assert_eq!(cl.who(), expected, "{addr} is served by {expected}");
            assert_eq!(cl.peer(), dst, "and still talks to A's address");
        }
    }
}

#[test]
fn clients_of_a_dead_volunteer_come_home() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(40, &[("a", 20, 10), ("b", 40, 30)]);
    let conns = open(&c, 1..=30, svc(SERVICE4));
    let a = wait_status(&c.sock("a"), 30, "A to move clients to B", |v| migrated(v).len() >= 20);
    let moved: Vec<String> = migrated(&a).into_iter().map(|m| m.0).collect();
    drop(conns);
    // B dies: the process is killed, then its link goes down.
    let died = std::time::Instant::now();
    c.agents.get_mut("b").expect("agent b").kill();
    c.t.b.ip(&["link", "set", "eth0", "down"]);
    // Liveness is 1.5 s here: A drains the rules and takes its clients back.
    wait_status(&c.sock("a"), 10, "A to give B's clients back", |v| migrated(v).is_empty());
    let took = died.elapsed();
    // Liveness 1.5 s, plus one heartbeat interval of checking and our own polling.
    assert!(took < Duration::from_millis(1500 + 1500), "clients came home {took:?} after the volunteer died (liveness 1.5 s)");
    let rules = c.t.redirector_ok(&c.t.a, &["rule", "list", "--json"]);
    assert!(!rules.contains("\"active\""), "no active rule points at the dead volunteer: {rules}");
    let first: u16 = moved[0].rsplit('.').next().and_then(|x| x.parse().ok()).expect("client number");
    let mut back = Client::connect(&c.t.client.ns, IpAddr::V4(client4(first)), svc(SERVICE4));
    assert_eq!(back.who(), "A", "a client moved to the dead volunteer is served by A again");
    assert!(c.log("a").contains("liveness"), "the decision is logged");
}

/// Two nodes, A and B, and A's peer channel address (the tests that speak to it as a sibling
/// or a stranger with a connection of their own).
fn a_and_b() -> (Cluster, SocketAddr) {
    let c = Cluster::new(4, &[("a", 100, 50), ("b", 100, 50)]);
    let a_addr = SocketAddr::new(IpAddr::V4(c.t.a.v4[0]), 7470);
    (c, a_addr)
}

#[test]
fn strangers_are_refused_with_a_reason_and_bad_frames_only_close_their_connection() {
    if !require_root() {
        return;
    }
    let (c, a_addr) = a_and_b();
    let (tls, ca) = (c.dir.join("tls"), c.dir.join("tls/ca.pem"));
    // A client that trusts the cluster CA (so it accepts A's certificate) but presents a
    // certificate named "b" from another CA: A's verification of client certificates is
    // what refuses it, and it can make nothing happen.
    let evil = c.dir.join("evil");
    redirector_tests::agents::make_certs(&evil, &["b"]);
    let mut bad = tls_connect(&c.t.client.ns, &ca, &evil.join("b"), "a", a_addr);
    // Reading drives the handshake: the client accepts A and sends its certificate; the
    // answer is A's alert.
    let e = read_msg(&mut bad).expect_err("a peer with another CA's certificate gets no answer");
    assert!(
        e.to_string().contains("alert") && !e.to_string().contains("invalid peer certificate"),
        "the server refused the client's certificate (not the client the server's): {e}"
    );
    wait_log(&c, "a", "TLS handshake refused", 5);
    let client_ip = c.t.client.v4[0].to_string();
    assert!(c.log("a").lines().any(|l| l.contains("TLS handshake refused") && l.contains(&client_ip)), "A logged the refusal with the peer's address {client_ip}:\n{}", c.log("a"));
    // A certificate from the cluster CA for a name that is not a sibling: refused, with the
    // reason sent before the connection closes.
    redirector::certs::make_node(&tls, "mallory", redirector::certs::NODE_DAYS).expect("mallory cert");
    let mut m = tls_connect(&c.t.client.ns, &ca, &tls.join("mallory"), "a", a_addr);
    send(&mut m, hello("mallory"));
    match read_msg(&mut m) {
        Ok(Frame::Refused { reason }) => assert!(reason.contains("not for a configured sibling"), "{reason}"),
        other => panic!("mallory should be told why it is refused: {other:?}"),
    }
    wait_log(&c, "a", "not for a configured sibling", 5);
    // B's genuine certificate, from an address that is not B's: refused, with the reason.
    let mut s = tls_connect(&c.t.client.ns, &ca, &tls.join("b"), "a", a_addr);
    send(&mut s, hello("b"));
    match read_msg(&mut s) {
        Ok(Frame::Refused { reason }) => assert!(reason.contains(&format!("comes from {client_ip}, not b's configured control address")), "{reason}"),
        other => panic!("b's certificate from a client's address should be refused: {other:?}"),
    }
    // The right certificate from B's address (a connection of the test's own, in B's
    // namespace), but another protocol version: A answers with its own hello (any version can
    // read it) so the peer can say which versions differ, and logs the reason.
    let mut s = tls_connect(&c.t.b.ns, &ca, &tls.join("b"), "a", a_addr);
    send(&mut s, Frame::Hello { version: 99, node: "b".into() });
    match read_msg(&mut s) {
        Ok(Frame::Hello { version, node }) => assert_eq!((version, node.as_str()), (PROTOCOL_VERSION, "a"), "A says its version"),
        other => panic!("a peer of another version should get A's hello: {other:?}"),
    }
    assert!(read_msg(&mut s).is_err(), "then the connection closes");
    wait_log(&c, "a", "protocol version 99", 5);
    // A malformed frame and an oversized frame close only that connection.
    s = tls_connect(&c.t.b.ns, &ca, &tls.join("b"), "a", a_addr);
    send(&mut s, hello("b"));
    send_frame(&mut s, &[0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3]).expect("send garbage");
    wait_log(&c, "a", "malformed message", 5);
    s = tls_connect(&c.t.b.ns, &ca, &tls.join("b"), "a", a_addr);
    send(&mut s, hello("b"));
    let _ = s.write_all(&(1u32 << 30).to_be_bytes());
    let _ = s.flush();
    wait_log(&c, "a", "bad frame", 5);
    // The agent keeps serving everyone else: its status answers and B's link is still up;
    // nothing any stranger sent was installed.
    let v = c.status("a");
    assert_eq!(v["siblings"][0]["up"], true, "the real sibling is still connected: {v}");
    assert!(!v["siblings"].to_string().contains("mallory"));
    assert_eq!(v["adopted"], serde_json::json!([]), "nothing adopted: {v}");
    let siblings = c.t.redirector_ok(&c.t.a, &["sibling", "list", "--json"]);
    assert!(siblings.contains("\"siblings\":[]"), "A accepts tunnels from nobody: {siblings}");
}

/// A connection from `src` (a local address of the current namespace) to `dst`.
fn connect_from(src: std::net::Ipv4Addr, dst: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let SocketAddr::V4(dst) = dst else { panic!("IPv4 only") };
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(std::net::SocketAddrV4::new(src, 0)))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    Ok(std::net::TcpStream::from(fd))
}

/// Descriptors process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Connections that never start a handshake, from four client addresses, flooding A's
/// control port: A holds a bounded number of them (each would otherwise keep a descriptor and
/// a task for the 5 s handshake window), and meanwhile a restarted sibling links up, an
/// application registers on the hook and the admin socket answers.
#[test]
fn a_flood_of_unauthenticated_connections_does_not_stop_siblings_the_hook_or_the_admin_socket() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(4, &[("a", 100, 50), ("b", 100, 50)]);
    c.kill_agent("b");
    let a_pid = c.agents["a"].child.id();
    let before = open_fds(a_pid);
    // The flood's sockets are this process's: room for them (A keeps the limit it started with).
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain calls on a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(8192);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim), 0, "RLIMIT_NOFILE");
    }
    assert!(lim.rlim_cur >= 4096, "room for the flood: {}", lim.rlim_cur);
    let (stop, opened) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let a_ctl = SocketAddr::new(IpAddr::V4(c.t.a.v4[0]), 7470);
    let flood = {
        let (ns, stop, opened) = (c.t.client.ns.clone(), stop.clone(), opened.clone());
        std::thread::spawn(move || {
            redirector_tests::net::in_netns(&ns, move || {
                let t0 = Instant::now();
                let mut held = std::collections::VecDeque::new();
                // Bounded: 60,000 connections or 30 s (2,000 a second at most), at most 2,000
                // held at once.
                for i in 0..60_000u32 {
                    if stop.load(Ordering::Relaxed) || t0.elapsed() > Duration::from_secs(30) {
                        break;
                    }
                    if i % 4 == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    if let Ok(s) = connect_from(client4(1 + u16::try_from(i % 4).expect("small")), a_ctl) {
                        held.push_back(s);
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    if held.len() > 2_000 {
                        held.pop_front();
                    }
                }
                held.len()
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while opened.load(Ordering::Relaxed) < 1_500 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(opened.load(Ordering::Relaxed) >= 1_500, "the flood is under way");
    let during = open_fds(a_pid);
    assert!(during < before + 100, "A holds a bounded number of strangers' connections: {before} descriptors before, {during} during the flood");
    // B comes back and links up; an application registers; the admin socket answers.
    c.start_again("b", None);
    wait_status(&c.sock("a"), 15, "B to link up with A during the flood", |v| v["siblings"][0]["up"] == true);
    let mut app = std::os::unix::net::UnixStream::connect(c.dir.join("a-app.sock")).expect("connect to A's hook");
    app.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    writeln!(app, r#"{{"op":"register","service":"{}","version":2}}"#, svc(SERVICE4)).expect("register");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(app), &mut line).expect("an answer");
    assert!(line.contains("registered"), "{line}");
    assert!(!stop.load(Ordering::Relaxed) && !flood.is_finished(), "all of it happened during the flood");
    stop.store(true, Ordering::Relaxed);
    flood.join().expect("flood");
    let log = c.log("a");
    let refusals = log.lines().filter(|l| l.contains("control connection closed at once")).count();
    assert!((1..=60).contains(&refusals), "A logged the refusals at a bounded rate: {refusals} lines");
}

/// A node's certificate on the deny list is refused both ways although the cluster CA issued
/// it; an expired one is refused in the handshake, and an agent whose own has expired does not
/// start, saying why.
#[test]
fn denied_and_expired_certificates_are_refused_both_ways() {
    if !require_root() {
        return;
    }
    let (mut c, a_addr) = a_and_b();
    let tls = c.dir.join("tls");
    let b_cert = redirector::peer::tls::read_certs(&tls.join("b.pem")).expect("b.pem").remove(0);
    // Listed as openssl prints it: upper case, with colons.
    let fp = redirector::peer::tls::fingerprint(&b_cert);
    let openssl = fp.as_bytes().chunks(2).map(|p| String::from_utf8_lossy(p).to_uppercase()).collect::<Vec<_>>().join(":");
    let a_toml = c.dir.join("a.toml");
    let text = std::fs::read_to_string(&a_toml).expect("a.toml");
    let key_line = format!("key = \"{}\"\n", tls.join("a.key").display());
    assert!(text.contains(&key_line), "{text}");
    std::fs::write(&a_toml, text.replace(&key_line, &format!("{key_line}deny = [\"{openssl}\"]\n"))).expect("a.toml");
    c.restart("a");
    wait_log(&c, "a", "b's certificate is on this node's deny list", 15);
    wait_log(&c, "a", "presents a certificate on this node's deny list", 15);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.status("a")["siblings"][0]["up"], false, "A never links with B: {}", c.status("a"));
    // A certificate of the cluster CA for b that has expired, from B's address.
    let expired = redirector_tests::agents::expired_cert(&tls, "b");
    let mut s = tls_connect(&c.t.b.ns, &tls.join("ca.pem"), &expired.join("b"), "a", a_addr);
    let e = read_msg(&mut s).expect_err("an expired certificate gets no answer");
    assert!(e.to_string().contains("alert"), "refused in the handshake: {e}");
    // B's agent with that certificate does not start.
    let b_toml = c.dir.join("b.toml");
    let text = std::fs::read_to_string(&b_toml).expect("b.toml");
    let swapped = text
        .replace(&tls.join("b.pem").display().to_string(), &expired.join("b.pem").display().to_string())
        .replace(&tls.join("b.key").display().to_string(), &expired.join("b.key").display().to_string());
    let expired_toml = c.dir.join("b-expired.toml");
    std::fs::write(&expired_toml, swapped).expect("config");
    let mut child = std::process::Command::new(redirector_tests::net::redirector_bin())
        .args(["agent", "--config"])
        .arg(&expired_toml)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the agent");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("an agent with an expired certificate kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert!(!status.success() && err.contains("expired on 2020-12-31"), "{status}: {err}");
}

/// A transfer of one client (`client4(3)`) of `services`, from `tunnel_src`.
/// The kernel's own word on a rare event reaches the agent's log: a burst of tunnelled packets
/// from a stranger is dropped and counted packet by packet, and B's agent logs it, with the
/// stranger's address, at most once a second per CPU (a flood costs no flood of log lines).
#[test]
fn the_kernel_reports_a_strangers_tunnel_in_the_agents_log_at_most_once_a_second_per_cpu() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(10, &[("a", 30, 20), ("b", 20, 10)]);
    let dropped = |v: &serde_json::Value| v["counters"]["dropped-bad"].as_u64().unwrap_or(0);
    let before = dropped(&c.status("b"));
    let stranger = client4(9);
    let syn = Pkt::tcp(Ip::V4(stranger, SERVICE4_B), 40_000, 80, packets::SYN).build_ip();
    let t0 = Instant::now();
    send_raw4_burst(&c.t.client.ns, libc::IPPROTO_IPIP, stranger, c.t.b.v4[0], syn, 300);
    let burst = t0.elapsed();
    wait_status(&c.sock("b"), 10, "B to count every dropped packet", |v| dropped(v) == before + 300);
    let said = format!("dropped a tunnelled packet from {stranger}");
    wait_log(&c, "b", &said, 10);
    let lines = c.log("b").lines().filter(|l| l.contains("from=\"kernel\"") && l.contains(&said)).count();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    // A CPU writes at most one line a second: the packets of a burst of `burst` are decided in
    // at most `burst` + 1 s on each (+ 1 s more for the last packets still in flight).
    let most = cpus * (usize::try_from(burst.as_secs()).unwrap_or(usize::MAX - 2) + 2);
    assert!(lines <= most, "{lines} kernel lines for a burst of 300 in {burst:?} on {cpus} CPUs (at most {most}):\n{}", c.log("b"));
}

fn transfer_msg(id: u64, services: &[&str], tunnel_src: &str) -> Request {
    Request::Transfer {
        id,
        services: services.iter().map(|a| a.parse().expect("service")).collect(),
        tunnel_src: vec![tunnel_src.parse().expect("tunnel source")],
        clients: vec![MovedClient { addr: IpAddr::V4(client4(3)), connections: 1 }],
    }
}

/// Asks A for room as "b" on a connection of the test's own, then transfers `services` with
/// `tunnel_src`; returns A's answer to the transfer.
fn forged_transfer(s: &mut TlsStream, id: u64, services: &[&str], tunnel_src: &str) -> Answer {
    send(s, Request::HelpRequest { id, connections: 1, clients: 1 });
    match read_answer(s) {
        Ok(Answer::Offer { .. }) => {}
        other => panic!("A should offer room: {other:?}"),
    }
    send(s, transfer_msg(id, services, tunnel_src));
    // No sessions: sealed at once (a refused transfer's answer came already).
    send(s, Request::Sealed { id, sessions: Vec::new() });
    read_answer(s).expect("A answers the transfer")
}

#[test]
fn a_sibling_cannot_make_a_volunteer_adopt_what_is_not_its_to_give() {
    if !require_root() {
        return;
    }
    let (c, a_addr) = a_and_b();
    let tls = c.dir.join("tls");
    // A real sibling's certificate, but forged requests: A checks them against its own
    // configuration, not against what the message says.
    let mut s = connect_as(&c.t.b.ns, &tls, "b", "a", a_addr);
    let cases = [
        (["198.18.0.1:80"], "198.18.0.2", "own control address"),
        (["198.18.0.10:80"], "198.18.0.2", "own service addresses"),
        (["198.18.0.2:80"], "198.18.0.2", "control address of sibling b"),
        (["198.18.0.20:80"], "198.18.0.99", "not b's control address"),
        // A metadata address, and a third party's host: never b's to give.
        (["169.254.169.254:80"], "198.18.0.2", "link-local"),
        (["198.18.0.50:80"], "198.18.0.2", "not one of b's configured services"),
    ];
    for (i, (services, src, why)) in cases.iter().enumerate() {
        match forged_transfer(&mut s, 100 + i as u64, services, src) {
            Answer::Abort { reason, .. } => assert!(reason.contains(why), "{services:?} from {src}: refused because {why:?}, said {reason:?}"),
            other => panic!("{services:?} from {src} must be refused: {other:?}"),
        }
    }
    let adopted = c.t.redirector_ok(&c.t.a, &["adopt", "list", "--json"]);
    assert!(adopted.contains("\"adopted\":[]"), "A adopted nothing: {adopted}");
    let siblings = c.t.redirector_ok(&c.t.a, &["sibling", "list", "--json"]);
    assert!(!siblings.contains("198.18.0.99"), "A accepts no tunnel from an address the message named: {siblings}");
    assert_eq!(c.status("a")["adopted"], serde_json::json!([]));
    // A transfer A never offered room for (or whose lease ran out) is refused, and A goes on
    // serving: its status answers.
    send(&mut s, transfer_msg(150, &["198.18.0.20:80"], "198.18.0.2"));
    match read_answer(&mut s) {
        Ok(Answer::Abort { reason, .. }) => assert!(reason.contains("no reservation"), "refused for want of a reservation: {reason:?}"),
        other => panic!("a transfer without a reservation must be refused: {other:?}"),
    }
    assert_eq!(c.status("a")["adopted"], serde_json::json!([]), "A still answers and adopted nothing");
    // The genuine article is accepted: B's own service, from B's control address.
    match forged_transfer(&mut s, 200, &["198.18.0.20:80"], "198.18.0.2") {
        Answer::TransferAck { .. } => {}
        other => panic!("a transfer A's configuration confirms is accepted: {other:?}"),
    }
    // The origin aborts it with a reason made to forge a line of A's log and flood it: A
    // repeats it on one line, cut short.
    let reason = format!("test over\nFORGED ERROR line {}", "x".repeat(100_000));
    send(&mut s, Request::Abort { id: 200, reason });
    wait_log(&c, "a", "origin aborted: test over", 10);
    let log = c.log("a");
    let line = log.lines().find(|l| l.contains("origin aborted: test over")).expect("the abort's line");
    assert!(line.contains("test over\\u{a}FORGED ERROR") && line.len() < 1000, "escaped and cut: {line}");
    assert!(!log.lines().any(|l| l.starts_with("FORGED")), "no line of the sibling's own in A's log");
}

/// A sibling that asks without end (here a test's connection with b's certificate) is told to
/// ask again past a burst, and its questions about hand-overs A never started leave a bounded
/// number of records in A's state folder, each of a bounded sample of the clients named.
#[test]
fn a_sibling_that_asks_without_end_is_held_to_a_rate_and_leaves_few_records() {
    if !require_root() {
        return;
    }
    let (c, a_addr) = a_and_b();
    let mut s = connect_as(&c.t.b.ns, &c.dir.join("tls"), "b", "a", a_addr);
    let n = 400u64;
    for id in 0..n {
        send(&mut s, Request::HelpRequest { id: 10_000 + id, connections: 1, clients: 1 });
    }
    let (mut told_to_wait, mut offers) = (0, 0);
    for _ in 0..n {
        match read_answer(&mut s).expect("A answers every request") {
            Answer::Decline { reason, .. } => told_to_wait += usize::from(reason.contains("too many requests")),
            Answer::Offer { .. } => offers += 1,
            other => panic!("a help request is answered with an offer or a decline: {other:?}"),
        }
    }
    assert!(told_to_wait >= 200, "past a burst, A tells the sibling to wait: {told_to_wait} of {n}");
    assert!(offers <= 4, "a sibling holds at most 4 offers of room at once, not all of it: {offers}");
    // Questions about 300 hand-overs A never started, each naming 2,000 clients (a real
    // volunteer names a sample of 256 at most), paced to the rate A serves.
    let many: Vec<IpAddr> = (0..2000u32).map(|i| IpAddr::V4(std::net::Ipv4Addr::from(u32::from(client4(1)) + i))).collect();
    std::thread::sleep(Duration::from_secs(3));
    for id in 0..300u64 {
        send(&mut s, Request::Outcome { id: 20_000 + id, handoff: 20_000 + id, back: false, clients: many.clone() });
        let _ = read_answer(&mut s).expect("A answers every question");
        std::thread::sleep(Duration::from_millis(25));
    }
    let state = c.dir.join("a-state");
    let records: Vec<PathBuf> =
        std::fs::read_dir(&state).expect("A's state folder").map(|e| e.expect("entry").path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
    assert!(records.len() <= 64, "at most 64 records of b's questions are kept, not one per question: {}", records.len());
    for r in &records {
        let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(r).expect("record")).expect("JSON");
        assert!(rec["clients"].as_array().is_some_and(|c| c.len() <= 256), "a record holds a sample of the clients: {}", r.display());
    }
    // Past its lease, A offers room to b again: the sibling is served, not shut out.
    std::thread::sleep(Duration::from_secs(3));
    send(&mut s, Request::HelpRequest { id: 30_000, connections: 1, clients: 1 });
    assert!(matches!(read_answer(&mut s), Ok(Answer::Offer { .. })), "A serves b again");
}

/// `redirector move CLIENT --to NODE` moves the client to that sibling, even when another has
/// more room; a node that is not a sibling is refused with a clear message.
#[test]
fn an_operator_moves_a_client_to_the_sibling_named() {
    if !require_root() {
        return;
    }
    // B has far more room than C: left to itself, A would pick B.
    let c = Cluster::new(4, &[("a", 100, 50), ("b", 1000, 500), ("c", 100, 50)]);
    let (x, y) = (IpAddr::V4(client4(1)), IpAddr::V4(client4(2)));
    for (client, to) in [(x, "c"), (y, "b")] {
        let answer = c.ask_agent("a", &["move".into(), client.to_string(), "--to".into(), to.into()]).expect("move --to");
        assert_eq!(answer["moved"], 1, "{answer}");
        let moved = redirector_tests::agents::moved_to(&c.status("a"));
        assert_eq!(moved.get(&client).map(String::as_str), Some(to), "{client} is steered to {to}: {moved:?}");
    }
    let err = c.ask_agent("a", &["move".into(), IpAddr::V4(client4(3)).to_string(), "--to".into(), "mallory".into()]).expect_err("not a sibling");
    assert!(err.contains("mallory is not a sibling of this node (its siblings: b, c)"), "{err}");
}

/// A's service as B's kernel holds it: in B's ADOPTED map, and as a local route.
fn b_holds_a_service(c: &Cluster) -> (bool, bool) {
    let adopted = c.t.redirector_ok(&c.t.b, &["adopt", "list", "--json"]);
    let routes = c.t.b.ip(&["route", "show", "table", "local"]);
    (adopted.contains(&SERVICE4.to_string()), routes.lines().any(|l| l.split_whitespace().nth(1) == Some(&SERVICE4.to_string())))
}

/// A volunteer gives an origin's service back (its route and ADOPTED entry) once no client of
/// that origin is adopted there any more, and adopts it again for the next one.
#[test]
fn a_volunteer_gives_an_adopted_service_back_once_no_client_of_it_is_left() {
    if !require_root() {
        return;
    }
    let c = Cluster::with_config(4, &[("a", 100, 50), ("b", 100, 50)], "unadopt_after_secs = 2\n");
    let x = IpAddr::V4(client4(1));
    for round in 0..2 {
        let answer = c.ask_agent("a", &["move".into(), x.to_string()]).expect("move");
        assert_eq!(answer["moved"], 1, "round {round}: {answer}");
        assert_eq!(b_holds_a_service(&c), (true, true), "round {round}: B adopted A's service for x");
        // Past the linger, with x still adopted: B keeps it.
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(b_holds_a_service(&c), (true, true), "round {round}: x is still adopted, B keeps A's service");
        std::thread::sleep(redirector::agent::MOVE_DWELL);
        let answer = c.give_back("a", &[x]).expect("give-back");
        assert_eq!(answer["given_back"], 1, "round {round}: {answer}");
        let deadline = Instant::now() + Duration::from_secs(15);
        while b_holds_a_service(&c) != (false, false) {
            assert!(Instant::now() < deadline, "round {round}: B still holds A's service 15 s after its last client went home: {:?}\n{}", b_holds_a_service(&c), c.log("b"));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// B's application reports an import from C as unfinished (B's agent restarted, say) while C
/// cannot be asked how it ended: until it is known, a transfer of the same client is refused
/// (it would replace the tentative session, and the old hand-over's end would then drop or
/// keep the wrong one). Seen in a fresh-clone run: the origin moved the same clients again
/// while the restarted volunteer was still asking, and the abort of the first hand-over found
/// nothing of its own to drop.
#[test]
fn a_client_whose_import_is_still_undecided_is_not_imported_again() {
    use std::io::{BufRead as _, BufReader};
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(4, &[("a", 100, 50), ("b", 100, 50), ("c", 100, 50)]);
    c.kill_agent("c");
    let y = IpAddr::V4(client4(3));
    // The test application does not use the hook: this process registers B's service, with
    // an import from C it never heard the end of.
    let mut app = std::os::unix::net::UnixStream::connect(c.dir.join("b-app.sock")).expect("connect to B's hook");
    app.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let pending = serde_json::json!([{"handoff": "c/987654321/b", "role": "import", "clients": [y]}]);
    writeln!(app, r#"{{"op":"register","service":"{}","version":2,"pending":{pending}}}"#, svc(SERVICE4_B)).expect("register");
    let mut line = String::new();
    BufReader::new(app.try_clone().expect("clone")).read_line(&mut line).expect("a line from the agent");
    assert!(line.contains("registered"), "{line}");
    wait_log(&c, "b", "asking c how it ended", 10);
    // "C" (a connection of the test's own with c's certificate, from C's address) moves y to B.
    let b_addr = SocketAddr::new(IpAddr::V4(c.t.b.v4[0]), 7470);
    let mut s = connect_as(&c.t.c.ns, &c.dir.join("tls"), "c", "b", b_addr);
    match forged_transfer(&mut s, 300, &[&svc(SERVICE4_C).to_string()], &c.t.c.v4[0].to_string()) {
        Answer::Abort { reason, .. } => assert!(reason.contains(&format!("{y} is in another hand-over here")), "{reason}"),
        other => panic!("y's import from C is undecided: a new transfer of y must be refused, got {other:?}"),
    }
    assert!(redirector_tests::agents::adopted(&c.status("b")).is_empty(), "B adopted nothing: {}", c.status("b"));
}

/// A process on the hook reports, as unfinished, a hand-over A keeps no record of, naming a
/// client A steers to B along with two it does not: A answers from its rules and steers no
/// one new. A second instance of the service is refused while the first is connected.
#[test]
fn an_application_cannot_make_the_agent_steer_clients_it_names() {
    use std::io::{BufRead as _, BufReader};
    if !require_root() {
        return;
    }
    let c = Cluster::new(4, &[("a", 100, 50), ("b", 100, 50)]);
    let (x, y, z) = (IpAddr::V4(client4(1)), IpAddr::V4(client4(3)), IpAddr::V4(client4(4)));
    let answer = c.ask_agent("a", &["move".into(), x.to_string()]).expect("move");
    assert_eq!(answer["moved"], 1, "{answer}");
    // The test application does not use the hook: this process registers A's service.
    let hook = c.dir.join("a-app.sock");
    let mut app = std::os::unix::net::UnixStream::connect(&hook).expect("connect to A's hook");
    app.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let pending = serde_json::json!([{"handoff": "a/987654321/b", "role": "export", "clients": [x, y, z]}]);
    writeln!(app, r#"{{"op":"register","service":"{}","version":2,"pending":{pending}}}"#, svc(SERVICE4)).expect("register");
    let mut lines = BufReader::new(app.try_clone().expect("clone"));
    let mut line = String::new();
    let mut next = || -> serde_json::Value {
        line.clear();
        lines.read_line(&mut line).expect("a line from the agent");
        serde_json::from_str(&line).expect("JSON")
    };
    assert_eq!(next()["op"], "registered");
    // x is steered to B: for the rules, a hand-over to B of x committed.
    let req = next();
    assert_eq!((req["op"].as_str(), req["handoff"].as_str()), (Some("commit"), Some("a/987654321/b")), "{req}");
    writeln!(app, r#"{{"id":{},"ok":true}}"#, req["id"]).expect("answer");
    std::thread::sleep(Duration::from_secs(1));
    let steered: BTreeSet<String> = c.rules("a").iter().filter_map(|r| r["prefix"].as_str().map(|p| p.trim_end_matches("/32").to_string())).collect();
    assert_eq!(steered, BTreeSet::from([x.to_string()]), "A steers x only");
    let moved: Vec<IpAddr> = redirector_tests::agents::moved_to(&c.status("a")).into_keys().collect();
    assert_eq!(moved, vec![x], "A's status says x only");
    // A second instance of the service is refused, and says which process holds it.
    let mut second = std::os::unix::net::UnixStream::connect(&hook).expect("connect to A's hook");
    second.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    writeln!(second, r#"{{"op":"register","service":"{}","version":2}}"#, svc(SERVICE4)).expect("register");
    let mut refused = String::new();
    BufReader::new(second).read_line(&mut refused).expect("an answer");
    assert!(refused.contains("served by another application connection") && refused.contains(&format!("pid {}", std::process::id())), "{refused}");
}

/// A client A holds for one origin cannot be handed to it by another: its session here would
/// be replaced.
#[test]
fn a_volunteer_refuses_a_client_it_holds_for_another_origin() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(4, &[("a", 100, 50), ("b", 100, 50), ("c", 100, 50)]);
    let a_addr = SocketAddr::new(IpAddr::V4(c.t.a.v4[0]), 7470);
    let tls = c.dir.join("tls");
    // As C, from C's control address: C's service, client4(3) (committed: A adopts it).
    let mut from_c = connect_as(&c.t.c.ns, &tls, "c", "a", a_addr);
    match forged_transfer(&mut from_c, 300, &["198.18.0.30:80"], "198.18.0.3") {
        Answer::TransferAck { .. } => {}
        other => panic!("C's transfer of its own service is accepted: {other:?}"),
    }
    send(&mut from_c, Request::Commit { id: 300 });
    wait_status(&c.sock("a"), 10, "A to adopt client4(3) from C", |v| adopted_by(v).contains(&client4(3).to_string()));
    // As B, the same client.
    let mut from_b = connect_as(&c.t.b.ns, &tls, "b", "a", a_addr);
    match forged_transfer(&mut from_b, 301, &["198.18.0.20:80"], "198.18.0.2") {
        Answer::Abort { reason, .. } => assert!(reason.contains("adopted from c"), "refused because A holds it for C: {reason:?}"),
        other => panic!("a client A holds for C must be refused to B: {other:?}"),
    }
    let adopted = c.status("a")["adopted"].clone();
    assert!(adopted.as_array().is_some_and(|a| a.len() == 1 && a[0]["from"] == "c"), "A still holds it for C only: {adopted}");
}

/// One line in, one line out, on the agent's admin socket.
fn admin_line(sock: &std::path::Path, line: &[u8]) -> String {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect to the admin socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    // A line over the limit is cut short: the agent answers and closes before taking the
    // rest, so the end of this write may fail.
    let _ = s.write_all(line);
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer).expect("an answer");
    answer
}

/// The admin socket answers with the types both ends share: the typed client, the CLI's
/// `--json` and an earlier client's bare `status` read the same status, and only once the
/// agent runs. What it cannot read
/// (not JSON, an unknown operation or field, a client that is not an address, a line over
/// 1 MiB) gets a one-line reason, changes nothing, and the agent goes on answering.
#[test]
fn the_admin_socket_answers_typed_requests_and_refuses_what_it_cannot_read() {
    if !require_root() {
        return;
    }
    let c = Cluster::with_config(1, &[("a", 100, 50), ("b", 100, 50)], "");
    wait_status(&c.sock("a"), 20, "B up in A's agent", |v| v["siblings"][0]["up"] == true);
    let typed = redirector::admin::status(&c.sock("a")).expect("a typed status");
    // The admin socket appears once the agent runs: its hook socket is there too.
    assert!(c.dir.join("a-app.sock").exists(), "the hook socket exists once the agent answers");
    assert_eq!((typed.node.as_str(), typed.high_watermark, typed.siblings.len()), ("a", 100, 1), "{typed:?}");
    let bare: redirector::admin::api::Status = serde_json::from_str(&admin_line(&c.sock("a"), b"status\n")).expect("the bare word status reads as a Status");
    assert_eq!(bare.node, "a");
    let cli: redirector::admin::api::Status =
        serde_json::from_str(&c.t.redirector_ok(&c.t.a, &["status", "--socket", &c.sock("a").display().to_string(), "--json"])).expect("the CLI prints a Status");
    assert_eq!(cli.node, "a");
    let mut huge = br#"{"op":"move","clients":[""#.to_vec();
    huge.extend(std::iter::repeat_n(b'1', 2 << 20));
    huge.extend(b"\"]}\n");
    for (line, why) in [
        (&b"hello\n"[..], "unknown request"),
        (b"{\"op\":\"explode\"}\n", "malformed request"),
        (b"{\"op\":\"move\",\"clients\":[\"nobody\"]}\n", "malformed request"),
        (b"{\"op\":\"give-back\",\"clients\":[],\"all\":true}\n", "malformed request"),
        (&huge[..], "malformed request"),
    ] {
        let answer = admin_line(&c.sock("a"), line);
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
        assert!(v["error"].as_str().is_some_and(|e| e.contains(why) && e.len() < 400), "{why}: {answer}");
    }
    let e = redirector::admin::give_back(&c.sock("a"), vec!["198.18.1.1".parse().expect("address")], Duration::from_secs(10)).map(|g| g.given_back);
    assert!(e.as_ref().is_err_and(|e| e.to_string().contains("not moved out from here nor adopted here")), "a client that was never moved is refused, with the reason: {e:?}");
    let after = redirector::admin::status(&c.sock("a")).expect("the agent still answers");
    assert!(after.migrated_out.is_empty() && after.adopted.is_empty(), "nothing moved: {after:?}");
    for cmd in ["status", "drain", "undrain"] {
        let gone = c.t.redirector(&c.t.a, &[cmd, "--socket", "/nonexistent/redirector.sock"]);
        assert!(!gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("is the agent running?"), "{cmd}: {gone:?}");
    }
}
