//! Real TCP through the redirect, in network namespaces: a client namespace with several
//! client addresses, servers A and B on a bridge.

use std::net::{IpAddr, SocketAddr};

use redirector_tests::{
    Client, Server, Topology,
    app::try_connect,
    net::{SERVICE4, SERVICE6, client4, client6},
    require_root,
};

fn svc4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(SERVICE4), port)
}

fn svc6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(SERVICE6), port)
}

type Servers = (Server, Server, Server, Server);

/// The usual start: a topology, the servers, and A steering its service (both families) with B
/// ready to serve it. None when the test cannot run (not root, outside CI).
fn steered() -> Option<(Topology, Servers)> {
    if !require_root() {
        return None;
    }
    let t = Topology::new(8);
    let s = servers(&t, 80);
    t.steer_a_to_b(80, 80);
    Some((t, s))
}

/// A serves the service address; B serves only on its own address.
fn servers(t: &Topology, port: u16) -> Servers {
    (
        Server::start(&t.a.ns, "A", svc4(port)),
        Server::start(&t.a.ns, "A", svc6(port)),
        Server::start(&t.b.ns, "B", SocketAddr::new(IpAddr::V4(t.b.v4[0]), port)),
        Server::start(&t.b.ns, "B", SocketAddr::new(IpAddr::V6(t.b.v6[0]), port)),
    )
}

#[test]
fn new_connections_of_a_migrated_client_go_to_b_and_old_ones_stay() {
    let Some((t, _s)) = steered() else { return };
    let (c5, c6) = (IpAddr::V4(client4(5)), IpAddr::V4(client4(6)));
    let a_mac = t.a.mac();

    let mut before = Client::connect(&t.client.ns, c5, svc4(80));
    assert_eq!(before.who(), "A", "before the rule the client is served by A");
    let mut keepalive = Client::connect(&t.client.ns, c5, svc4(80));
    assert_eq!(keepalive.who(), "A");

    t.migrate(&c5.to_string(), IpAddr::V4(t.b.v4[0]));

    for i in 0..5 {
        let mut c = Client::connect(&t.client.ns, c5, svc4(80));
        let (name, seen) = c.try_who().expect("WHO after the rule");
        assert_eq!(name, "B", "new connection {i} after the rule: expected B, got {name}");
        assert_eq!(seen, c5.to_string(), "B sees the client's own address");
        assert_eq!(c.peer(), svc4(80), "the client still talks to A's address");
    }
    for _ in 0..3 {
        assert_eq!(keepalive.who(), "A", "a keep-alive connection opened before the rule stays on A");
    }
    assert_eq!(before.who(), "A");
    let mut other = Client::connect(&t.client.ns, c6, svc4(80));
    assert_eq!(other.who(), "A", "other clients are unaffected");

    let neigh = t.client.ip(&["neigh", "show", &SERVICE4.to_string()]);
    assert!(neigh.contains(&a_mac), "the client's ARP entry for A's address keeps A's MAC {a_mac}: {neigh}");
    assert!(!neigh.contains(&t.b.mac()), "B never answered ARP for A's address: {neigh}");
    assert!(t.counter(&t.a, "forwarded-new") >= 5);
    assert!(t.counter(&t.a, "kept-local") >= 3, "A's keep-alive packets were seen and kept");
    assert!(t.counter(&t.b, "sk-assigned") >= 5, "B delivered through sk_lookup");
}

#[test]
fn ipv6_clients_are_steered_too() {
    let Some((t, _s)) = steered() else { return };
    let c5 = IpAddr::V6(client6(5));
    let mut keepalive = Client::connect(&t.client.ns, c5, svc6(80));
    assert_eq!(keepalive.who(), "A");
    t.migrate(&c5.to_string(), IpAddr::V6(t.b.v6[0]));
    let mut c = Client::connect(&t.client.ns, c5, svc6(80));
    assert_eq!(c.who(), "B", "a new IPv6 connection goes to B");
    assert_eq!(c.peer(), svc6(80));
    assert_eq!(keepalive.who(), "A", "the old IPv6 connection stays on A");
    let mut other = Client::connect(&t.client.ns, IpAddr::V6(client6(6)), svc6(80));
    assert_eq!(other.who(), "A");
    let neigh = t.client.ip(&["-6", "neigh", "show", &SERVICE6.to_string()]);
    assert!(neigh.contains(&t.a.mac()), "ND entry for A's address is A's: {neigh}");
}

#[test]
fn prefixes_steer_every_client_inside() {
    let Some((t, _s)) = steered() else { return };
    // 198.18.1.0/29 holds clients 1..=7, not 8.
    t.redirector_ok(&t.a, &["rule", "add", "198.18.1.0/29", "--to", &t.b.v4[0].to_string()]);
    for i in 1..=7 {
        let mut c = Client::connect(&t.client.ns, IpAddr::V4(client4(i)), svc4(80));
        assert_eq!(c.who(), "B", "client {i} inside the prefix goes to B");
    }
    let mut out = Client::connect(&t.client.ns, IpAddr::V4(client4(8)), svc4(80));
    assert_eq!(out.who(), "A", "client 8 outside the prefix stays on A");
}

#[test]
fn drain_keeps_flows_on_b_then_gives_the_client_back() {
    let Some((t, _s)) = steered() else { return };
    let c5 = IpAddr::V4(client4(5));
    t.migrate(&c5.to_string(), IpAddr::V4(t.b.v4[0]));
    let mut on_b = Client::connect(&t.client.ns, c5, svc4(80));
    assert_eq!(on_b.who(), "B");

    t.redirector_ok(&t.a, &["rule", "del", &c5.to_string(), "--drain", "3"]);
    let list = t.redirector_ok(&t.a, &["rule", "list", "--json"]);
    assert!(list.contains("\"draining\""), "the rule is listed as draining: {list}");
    let mut new = Client::connect(&t.client.ns, c5, svc4(80));
    assert_eq!(new.who(), "A", "during the drain new connections stay on A");
    for _ in 0..3 {
        assert_eq!(on_b.who(), "B", "during the drain the flow living on B keeps going there");
    }
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let list = t.redirector_ok(&t.a, &["rule", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).expect("rule list JSON");
    assert_eq!(v["rules"].as_array().map(Vec::len), Some(0), "after the drain the rule is gone: {list}");
    let mut after = Client::connect(&t.client.ns, c5, svc4(80));
    assert_eq!(after.who(), "A");

    // Release: removed at once.
    t.migrate(&c5.to_string(), IpAddr::V4(t.b.v4[0]));
    assert_eq!(Client::connect(&t.client.ns, c5, svc4(80)).who(), "B");
    t.redirector_ok(&t.a, &["rule", "del", &c5.to_string(), "--now"]);
    assert_eq!(Client::connect(&t.client.ns, c5, svc4(80)).who(), "A", "released: back on A at once");
}

#[test]
fn steering_continues_while_no_process_runs_and_state_is_readopted() {
    let Some((t, _s)) = steered() else { return };
    let c5 = IpAddr::V4(client4(5));
    t.migrate(&c5.to_string(), IpAddr::V4(t.b.v4[0]));
    // Every CLI call has exited by now (the harness waits for each): only the pins hold the
    // programs and maps.
    let before = t.counter(&t.a, "forwarded-new");
    for _ in 0..3 {
        assert_eq!(Client::connect(&t.client.ns, c5, svc4(80)).who(), "B");
    }
    assert_eq!(t.counter(&t.a, "forwarded-new"), before + 3, "a new process reads the same pinned counters");
    let list = t.redirector_ok(&t.a, &["rule", "list", "--json"]);
    assert!(list.contains("198.18.1.5/32"), "a new process re-adopts the pinned rules: {list}");
    // Re-running set-up commands is idempotent and keeps steering.
    t.steer_a_to_b(80, 80);
    assert_eq!(Client::connect(&t.client.ns, c5, svc4(80)).who(), "B");
    // Teardown detaches everything.
    t.redirector_ok(&t.a, &["teardown"]);
    assert_eq!(Client::connect(&t.client.ns, c5, svc4(80)).who(), "A", "after teardown A serves again");
}

#[test]
fn ten_mib_upload_and_download_through_the_redirect_with_offloads_on() {
    let Some((t, _s)) = steered() else { return };
    // veth defaults: TSO/GSO on, so the classifier sees large GSO packets.
    for h in [&t.client, &t.a, &t.b] {
        let feats = redirector_tests::net::offloads(&h.ns, "eth0");
        assert!(feats.tso && feats.gso, "offloads are on (veth default) on {}: {feats:?}", h.ns);
    }
    for (src, dst, target) in [
        (IpAddr::V4(client4(5)), svc4(80), t.b.v4[0].to_string()),
        (IpAddr::V6(client6(5)), svc6(80), t.b.v6[0].to_string()),
    ] {
        t.redirector_ok(&t.a, &["rule", "add", &src.to_string(), "--to", &target]);
        let data = redirector_tests::app::pattern(7, 10 << 20);
        let mut c = Client::connect(&t.client.ns, src, dst);
        eprintln!("uploading from {src}");
        let (name, ok) = c.upload(&data);
        assert_eq!(name, "B", "the upload went to B");
        assert!(ok, "10 MiB upload from {src} arrived intact on B");
        assert!(c.download(10 << 20, 99), "10 MiB download to {src} arrived intact");
    }
    assert_eq!(t.counter(&t.a, "error-forward"), 0);
}

#[test]
fn a_target_that_is_not_ready_is_never_used() {
    if !require_root() {
        return;
    }
    let t = Topology::new(8);
    let _s = servers(&t, 80);
    let _c = Server::start(&t.c.ns, "C", SocketAddr::new(IpAddr::V4(t.c.v4[0]), 80));
    t.steer_a_to_b(80, 80);
    // C accepts A's tunnels but has not adopted the service; then adopts it without listener
    // on the port: both fail the probe, nothing is installed.
    t.redirector_ok(&t.c, &["sibling", "add", &t.a.v4[0].to_string(), "--dev", "eth0"]);
    let c5 = client4(5).to_string();
    let out = t.redirector(&t.a, &["rule", "add", &c5, "--to", &t.c.v4[0].to_string(), "--probe-timeout-ms", "500"]);
    assert!(!out.status.success(), "rule add to a target that did not adopt the service must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.contains("did not answer"), "clear one-line error: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let list = t.redirector_ok(&t.a, &["rule", "list", "--json"]);
    assert!(!list.contains(&c5), "nothing installed: {list}");
    assert_eq!(Client::connect(&t.client.ns, IpAddr::V4(client4(5)), svc4(80)).who(), "A");
    // A target that is ready passes the probe.
    t.redirector_ok(&t.c, &["adopt", "add", &svc4(80).to_string(), "--dev", "eth0", "--listener", &format!("{}:80", t.c.v4[0])]);
    t.redirector_ok(&t.a, &["rule", "add", &c5, "--to", &t.c.v4[0].to_string()]);
    assert_eq!(Client::connect(&t.client.ns, IpAddr::V4(client4(5)), svc4(80)).who(), "C");
    assert!(t.counter(&t.a, "probe-answer") >= 1);
}

#[test]
fn a_connection_refused_by_b_is_not_possible_for_other_clients() {
    // Clients that are not migrated never reach B, even when B serves nothing on the port.
    if !require_root() {
        return;
    }
    let t = Topology::new(8);
    let _a = Server::start(&t.a.ns, "A", svc4(8080));
    let r = try_connect(&t.client.ns, IpAddr::V4(client4(2)), svc4(8080));
    assert!(r.is_ok(), "A serves port 8080 directly");
}
