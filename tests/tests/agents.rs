//! Agents on three servers negotiating by themselves over mutual TLS, with real connections
//! from a client namespace with many client addresses.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use redirector::peer::{MovedClient, Msg, PROTOCOL_VERSION};

use redirector_tests::{
    Client,
    agents::{Cluster, migrated, open, served_by, wait_log, wait_status},
    net::{SERVICE4, SERVICE4_C, client4, in_netns},
    require_root,
};

fn svc(ip: std::net::Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), 80)
}

#[test]
fn an_overloaded_server_sheds_clients_to_its_siblings_by_itself() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(50, &[("a", 30, 20), ("b", 15, 10), ("c", 15, 10)]);
    // 45 clients with one connection each drive A over its high watermark (30).
    let conns = open(&c, 1..=45, svc(SERVICE4));
    assert_eq!(served_by(&conns).get("A"), Some(&45), "before shedding A serves everyone");
    let a = wait_status(&c.sock("a"), 30, "A to move clients under its low watermark", |v| migrated(v).len() >= 25);
    let moved = migrated(&a);
    let to_b = moved.iter().filter(|m| m.1 == "b").count();
    let to_c = moved.iter().filter(|m| m.1 == "c").count();
    assert!(to_b > 0 && to_c > 0, "A split its clients over both volunteers: b {to_b}, c {to_c}");
    assert!(to_b <= 15 && to_c <= 15, "no volunteer got more than its high watermark: b {to_b}, c {to_c}");
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
    for n in ["b", "c"] {
        let v = c.status(n);
        let load = v["load"].as_u64().unwrap_or(u64::MAX);
        assert!(load <= 15, "{n} stays at or under its high watermark: load {load}");
        assert!(!v["adopted"].as_array().is_none_or(Vec::is_empty), "{n} lists the clients it adopted: {v}");
    }
    assert!(c.log("a").contains("client moved"), "one log line per decision");
}

#[test]
fn two_overloaded_servers_cannot_overbook_one_volunteer() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(70, &[("a", 20, 10), ("b", 20, 10), ("c", 20, 10)]);
    // A and C both go over 20 at once; only B has room, for 20 connections in all.
    let a_conns = open(&c, 1..=30, svc(SERVICE4));
    let c_conns = open(&c, 31..=60, svc(SERVICE4_C));
    wait_status(&c.sock("a"), 30, "some shedding to happen", |_| {
        let to_b = |n: &str| migrated(&c.status(n)).iter().filter(|m| m.1 == "b").count();
        to_b("a") + to_b("c") > 0
    });
    // Give both origins time to ask again and again.
    std::thread::sleep(Duration::from_secs(3));
    let to_b = |n: &str| migrated(&c.status(n)).iter().filter(|m| m.1 == "b").count();
    let total = to_b("a") + to_b("c");
    assert!(total <= 20, "B was promised at most its room of 20 connections, got {total} clients (a {}, c {})", to_b("a"), to_b("c"));
    drop(a_conns);
    drop(c_conns);
    std::thread::sleep(Duration::from_millis(300));
    let _a = open(&c, 1..=30, svc(SERVICE4));
    let _c = open(&c, 31..=60, svc(SERVICE4_C));
    let b = wait_status(&c.sock("b"), 10, "B's load to be counted", |v| v["load"].as_u64().is_some_and(|l| l > 0));
    assert!(b["load"].as_u64().unwrap_or(u64::MAX) <= 20, "B never exceeds its high watermark: {}", b["load"]);
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

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TLS client connection to `addr` from the client namespace that trusts the CA in `ca`
/// and presents certificate `cert` (`<cert>.pem` and `<cert>.key`).
fn tls_connect(c: &Cluster, ca: &Path, cert: &Path, server_name: &str, addr: SocketAddr) -> TlsStream {
    let tls = redirector::peer::Tls::load(ca, &cert.with_extension("pem"), &cert.with_extension("key")).expect("load test certificates");
    let tcp = in_netns(&c.t.client.ns, move || std::net::TcpStream::connect(addr)).expect("TCP connect");
    tcp.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let conn = rustls::ClientConnection::new(Arc::clone(&tls.client), server_name.to_string().try_into().expect("name")).expect("TLS client");
    rustls::StreamOwned::new(conn, tcp)
}

fn send_frame(s: &mut impl std::io::Write, body: &[u8]) -> std::io::Result<()> {
    s.write_all(&u32::try_from(body.len()).expect("small").to_be_bytes())?;
    s.write_all(body)?;
    s.flush()
}

fn send(s: &mut TlsStream, m: &Msg) {
    send_frame(s, &m.encode()).unwrap_or_else(|e| panic!("sending {m:?}: {e}"));
}

fn read_msg(s: &mut TlsStream) -> std::io::Result<Msg> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body)?;
    Msg::decode(&body).map_err(std::io::Error::other)
}

fn hello(node: &str) -> Msg {
    Msg::Hello { version: PROTOCOL_VERSION, node: node.into() }
}

#[test]
fn strangers_are_refused_with_a_reason_and_bad_frames_only_close_their_connection() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(4, &[("a", 100, 50), ("b", 100, 50)]);
    let a_addr = SocketAddr::new(IpAddr::V4(c.t.a.v4[0]), 7470);
    let (tls, ca) = (c.dir.join("tls"), c.dir.join("tls/ca.pem"));
    // A client that trusts the cluster CA (so it accepts A's certificate) but presents a
    // certificate named "b" from another CA: A's verification of client certificates is
    // what refuses it, and it can make nothing happen.
    let evil = c.dir.join("evil");
    redirector_tests::agents::make_certs(&evil, &["b"]);
    let mut bad = tls_connect(&c, &ca, &evil.join("b"), "a", a_addr);
    // Reading drives the handshake: the client accepts A and sends its certificate; the
    // answer is A's alert.
    let e = read_msg(&mut bad).expect_err("a peer with another CA's certificate gets no answer");
    assert!(
        e.to_string().contains("alert") && !e.to_string().contains("invalid peer certificate"),
        "the server refused the client's certificate (not the client the server's): {e}"
    );
    wait_log(&c, "a", "TLS handshake refused", 5);
    let client_ip = c.t.client.v4[0].to_string();
    assert!(
        c.log("a").lines().any(|l| l.contains("TLS handshake refused") && l.contains(&client_ip)),
        "A logged the refusal with the peer's address {client_ip}:\n{}",
        c.log("a")
    );
    // A certificate from the cluster CA for a name that is not a sibling: refused, with the
    // reason sent before the connection closes.
    redirector::peer::make_node(&tls, "mallory").expect("mallory cert");
    let mut m = tls_connect(&c, &ca, &tls.join("mallory"), "a", a_addr);
    send(&mut m, &hello("mallory"));
    match read_msg(&mut m) {
        Ok(Msg::Refused { reason }) => assert!(reason.contains("not for a configured sibling"), "{reason}"),
        other => panic!("mallory should be told why it is refused: {other:?}"),
    }
    wait_log(&c, "a", "not for a configured sibling", 5);
    // The right certificate, but another protocol version: A answers with its own hello (any
    // version can read it) so the peer can say which versions differ, and logs the reason.
    let mut s = tls_connect(&c, &ca, &tls.join("b"), "a", a_addr);
    send(&mut s, &Msg::Hello { version: 99, node: "b".into() });
    match read_msg(&mut s) {
        Ok(Msg::Hello { version, node }) => assert_eq!((version, node.as_str()), (PROTOCOL_VERSION, "a"), "A says its version"),
        other => panic!("a peer of another version should get A's hello: {other:?}"),
    }
    assert!(read_msg(&mut s).is_err(), "then the connection closes");
    wait_log(&c, "a", "protocol version 99", 5);
    // A malformed frame and an oversized frame close only that connection.
    s = tls_connect(&c, &ca, &tls.join("b"), "a", a_addr);
    send(&mut s, &hello("b"));
    send_frame(&mut s, &[0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3]).expect("send garbage");
    wait_log(&c, "a", "malformed message", 5);
    s = tls_connect(&c, &ca, &tls.join("b"), "a", a_addr);
    send(&mut s, &hello("b"));
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

/// Asks A for room as "b" on a connection of the test's own, then transfers `services` with
/// `tunnel_src`; returns A's answer to the transfer.
fn forged_transfer(s: &mut TlsStream, id: u64, services: &[&str], tunnel_src: &str) -> Msg {
    send(s, &Msg::HelpRequest { id, connections: 1, clients: 1 });
    match read_msg(s) {
        Ok(Msg::Offer { .. }) => {}
        other => panic!("A should offer room: {other:?}"),
    }
    send(
        s,
        &Msg::Transfer {
            id,
            services: services.iter().map(|a| a.parse().expect("service")).collect(),
            tunnel_src: vec![tunnel_src.parse().expect("tunnel source")],
            clients: vec![MovedClient { addr: IpAddr::V4(client4(3)), connections: 1 }],
        },
    );
    read_msg(s).expect("A answers the transfer")
}

#[test]
fn a_sibling_cannot_make_a_volunteer_adopt_what_is_not_its_to_give() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(4, &[("a", 100, 50), ("b", 100, 50)]);
    let a_addr = SocketAddr::new(IpAddr::V4(c.t.a.v4[0]), 7470);
    let tls = c.dir.join("tls");
    // A real sibling's certificate, but forged requests: A checks them against its own
    // configuration, not against what the message says.
    let mut s = tls_connect(&c, &tls.join("ca.pem"), &tls.join("b"), "a", a_addr);
    send(&mut s, &hello("b"));
    assert!(matches!(read_msg(&mut s), Ok(Msg::Hello { .. })), "A greets its sibling");
    let cases = [
        (["198.18.0.1:80"], "198.18.0.2", "own control address"),
        (["198.18.0.10:80"], "198.18.0.2", "own service addresses"),
        (["198.18.0.2:80"], "198.18.0.2", "control address of sibling b"),
        (["198.18.0.20:80"], "198.18.0.99", "not b's control address"),
    ];
    for (i, (services, src, why)) in cases.iter().enumerate() {
        match forged_transfer(&mut s, 100 + i as u64, services, src) {
            Msg::Abort { reason, .. } => assert!(reason.contains(why), "{services:?} from {src}: refused because {why:?}, said {reason:?}"),
            other => panic!("{services:?} from {src} must be refused: {other:?}"),
        }
    }
    let adopted = c.t.redirector_ok(&c.t.a, &["adopt", "list", "--json"]);
    assert!(adopted.contains("\"adopted\":[]"), "A adopted nothing: {adopted}");
    let siblings = c.t.redirector_ok(&c.t.a, &["sibling", "list", "--json"]);
    assert!(!siblings.contains("198.18.0.99"), "A accepts no tunnel from an address the message named: {siblings}");
    assert_eq!(c.status("a")["adopted"], serde_json::json!([]));
    // The genuine article is accepted: B's own service, from B's control address.
    match forged_transfer(&mut s, 200, &["198.18.0.20:80"], "198.18.0.2") {
        Msg::TransferAck { .. } => {}
        other => panic!("a transfer A's configuration confirms is accepted: {other:?}"),
    }
    send(&mut s, &Msg::Abort { id: 200, reason: "test over".into() });
}
