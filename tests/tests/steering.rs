//! Real TCP through the redirect, in network namespaces: a client namespace with several
//! client addresses, servers A and B on a bridge.

use std::net::{IpAddr, SocketAddr};

use redirector_tests::{
    Client, Server, Topology,
    net::{SERVICE4, SERVICE6, client4, client6, sh},
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
    assert!(t.counter(&t.a, "probe-answer") >= 1, "the IPv6 rule went in after B answered the probe through the tunnel");
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
    for (src, dst, target) in [(IpAddr::V4(client4(5)), svc4(80), t.b.v4[0].to_string()), (IpAddr::V6(client6(5)), svc6(80), t.b.v6[0].to_string())] {
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
    // C adopts the service but registers no listener: the probe reaches C, which resets it.
    t.redirector_ok(&t.c, &["adopt", "add", &svc4(80).to_string(), "--dev", "eth0"]);
    let out = t.redirector(&t.a, &["rule", "add", &c5, "--to", &t.c.v4[0].to_string(), "--probe-timeout-ms", "2000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nothing listens there"), "a reset target is refused: {err}");
    assert!(!t.redirector_ok(&t.a, &["rule", "list", "--json"]).contains(&c5), "nothing installed");
    assert!(t.counter(&t.c, "sk-no-listener") >= 1, "C counted the connection it had no listener for");
    // A target that is ready passes the probe.
    t.redirector_ok(&t.c, &["adopt", "add", &svc4(80).to_string(), "--dev", "eth0", "--listener", &format!("{}:80", t.c.v4[0])]);
    t.redirector_ok(&t.a, &["rule", "add", &c5, "--to", &t.c.v4[0].to_string()]);
    assert_eq!(Client::connect(&t.client.ns, IpAddr::V4(client4(5)), svc4(80)).who(), "C");
    assert!(t.counter(&t.a, "probe-answer") >= 1);
}

#[test]
fn what_redirector_lets_pass_reaches_the_next_program_on_the_uplink() {
    // With TCX, a program's "pass" verdict (TC_ACT_OK) ends the chain: firewalls, shapers or
    // other agents attached after redirector would never see the traffic. Redirector must hand
    // what it does not own to the next program (TCX_NEXT).
    let Some((t, _s)) = steered() else { return };
    let (a_ns, client_ns, pin_dir) = (t.a.ns.clone(), t.client.ns.clone(), t.bpffs.join("second-program"));
    let runs = redirector_tests::in_netns(&a_ns, move || {
        use aya::programs::{SchedClassifier, TcAttachType, links::LinkOrder, tc::TcAttachOptions};
        std::fs::create_dir_all(&pin_dir).expect("pin dir");
        let mut ebpf = aya::EbpfLoader::new().default_map_pin_directory(&pin_dir).load(redirector::datapath::EBPF_OBJECT).expect("load the object");
        let prog: &mut SchedClassifier = ebpf.program_mut(redirector_common::programs::EMPTY).expect("empty program").try_into().expect("classifier");
        prog.load().expect("load the second program");
        prog.attach_with_options("eth0", TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::last())).expect("attach it after redirector");
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF statistics");
        let before = prog.info().expect("info").run_count();
        // A client with no rule: every packet passes redirector.
        for _ in 0..5 {
            let mut c = Client::connect(&client_ns, IpAddr::V4(client4(6)), svc4(80));
            assert_eq!(c.who(), "A");
        }
        prog.info().expect("info").run_count() - before
    });
    // Each connection brings at least SYN, ACK, request and FIN to A's uplink.
    assert!(runs >= 20, "the next program saw only {runs} packets of 5 connections that redirector let pass");
}

#[test]
fn a_rule_is_never_silently_moved_to_another_target() {
    if !require_root() {
        return;
    }
    let t = Topology::new(8);
    let _s = servers(&t, 80);
    let _c = Server::start(&t.c.ns, "C", SocketAddr::new(IpAddr::V4(t.c.v4[0]), 80));
    t.steer_a_to_b_v4(80, 80);
    t.redirector_ok(&t.c, &["sibling", "add", &t.a.v4[0].to_string(), "--dev", "eth0"]);
    t.redirector_ok(&t.c, &["adopt", "add", &svc4(80).to_string(), "--dev", "eth0", "--listener", &format!("{}:80", t.c.v4[0])]);
    let c5 = client4(5);
    t.migrate(&c5.to_string(), IpAddr::V4(t.b.v4[0]));
    let mut on_b = Client::connect(&t.client.ns, IpAddr::V4(c5), svc4(80));
    assert_eq!(on_b.who(), "B");
    // Moving it to C would send the packets of its flow living on B to C: refused.
    let out = t.redirector(&t.a, &["rule", "add", &c5.to_string(), "--to", &t.c.v4[0].to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "re-targeting without --replace must fail");
    assert!(err.starts_with("error: ") && err.contains("already migrated to 198.18.0.2"), "says why: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(t.redirector_ok(&t.a, &["rule", "list", "--json"]).contains(&t.b.v4[0].to_string()), "the rule still points at B");
    assert_eq!(on_b.who(), "B", "the flow on B is untouched");
    // Adding it again to the same target is harmless.
    t.migrate(&c5.to_string(), IpAddr::V4(t.b.v4[0]));
    // An explicit replacement is the operator's decision.
    t.redirector_ok(&t.a, &["rule", "add", &c5.to_string(), "--to", &t.c.v4[0].to_string(), "--replace"]);
    assert_eq!(Client::connect(&t.client.ns, IpAddr::V4(c5), svc4(80)).who(), "C", "new connections go to C now");
}

#[test]
fn adopting_sets_the_uplink_up_and_giving_back_restores_it() {
    if !require_root() {
        return;
    }
    let t = Topology::new(2);
    let _b = Server::start(&t.b.ns, "B", SocketAddr::new(IpAddr::V4(t.b.v4[0]), 80));
    let _b2 = Server::start(&t.b.ns, "B", SocketAddr::new(IpAddr::V4(t.b.v4[0]), 81));
    let keys = ["arp_ignore", "arp_announce", "accept_local", "rp_filter"];
    let read = |dev: &str| -> Vec<String> { keys.iter().map(|k| t.b.exec(&["sysctl", "-n", &format!("net.ipv4.conf.{dev}.{k}")]).trim().to_string()).collect() };
    // The interface starts as an operator left it: strict reverse-path filter, ARP defaults.
    for (k, v) in keys.iter().zip(["0", "0", "0", "1"]) {
        t.b.sysctl(&format!("net.ipv4.conf.eth0.{k}"), v);
    }
    let all_before = read("all");
    t.redirector_ok(&t.b, &["sibling", "add", &t.a.v4[0].to_string(), "--dev", "eth0"]);
    for port in [80, 81] {
        t.redirector_ok(&t.b, &["adopt", "add", &svc4(port).to_string(), "--dev", "eth0", "--listener", &format!("{}:{port}", t.b.v4[0])]);
    }
    assert_eq!(read("eth0"), ["1", "2", "1", "2"], "a target's uplink: no ARP for adopted addresses, local sources, loose RPF");
    assert_eq!(read("all"), all_before, "host-wide settings are never changed");
    assert!(t.b.ip(&["route", "show", "table", "local"]).contains(&SERVICE4.to_string()), "the adopted address is local");
    t.redirector_ok(&t.b, &["adopt", "del", &svc4(80).to_string()]);
    assert_eq!(read("eth0"), ["1", "2", "1", "2"], "another adopted service still uses the interface");
    t.redirector_ok(&t.b, &["adopt", "del", &svc4(81).to_string()]);
    assert_eq!(read("eth0"), ["0", "0", "0", "1"], "giving the last service back restores the operator's settings");
    assert!(!t.b.ip(&["route", "show", "table", "local"]).contains(&SERVICE4.to_string()), "the route is gone");
    // Teardown restores them as well.
    t.redirector_ok(&t.b, &["adopt", "add", &svc4(80).to_string(), "--dev", "eth0", "--listener", &format!("{}:80", t.b.v4[0])]);
    t.redirector_ok(&t.b, &["teardown"]);
    assert_eq!(read("eth0"), ["0", "0", "0", "1"], "teardown restores them too");
}

/// A switch floods a frame whose destination it has not learnt (a volunteer that just went
/// down, an entry aged out) to every port: a third server sees the origin's tunnelled packets
/// for B, and the client's for A. Its classifier leaves frames for another host to the stack
/// (which drops them): before, it took A's tunnel to B for a tunnel to itself and counted and
/// logged every packet as a bad tunnel "not from a configured sibling" (on each server of a
/// 12-server cluster when a volunteer died).
#[test]
fn frames_flooded_to_a_third_server_are_not_its_business() {
    let Some((t, _s)) = steered() else { return };
    // The bridge forgets every address at once: it floods every frame, like a hub.
    sh(&["ip", "-n", &t.switch, "link", "set", "br0", "type", "bridge", "ageing_time", "0"]);
    // C runs redirector for its own service, and takes tunnels from B only.
    let _c = Server::start(&t.c.ns, "C", SocketAddr::new(IpAddr::V4(t.c.v4[0]), 80));
    t.redirector_ok(&t.c, &["sibling", "add", &t.b.v4[0].to_string(), "--dev", "eth0"]);
    t.redirector_ok(&t.c, &["service", "add", "198.18.0.30:80", "--dev", "eth0"]);
    let rx = || -> u64 { t.c.exec(&["cat", "/sys/class/net/eth0/statistics/rx_packets"]).trim().parse().expect("rx_packets") };
    let rx_before = rx();
    let (c4, c6) = (client4(7), client6(7));
    t.migrate(&c4.to_string(), IpAddr::V4(t.b.v4[0]));
    t.migrate(&c6.to_string(), IpAddr::V6(t.b.v6[0]));
    for (client, svc) in [(IpAddr::V4(c4), svc4(80)), (IpAddr::V6(c6), svc6(80))] {
        for _ in 0..5 {
            assert_eq!(Client::connect(&t.client.ns, client, svc).who(), "B");
        }
    }
    assert!(t.counter(&t.a, "forwarded-new") >= 10, "A tunnelled them to B");
    let flooded = rx() - rx_before;
    assert!(flooded >= 40, "the bridge flooded the 10 connections' frames to C too: {flooded} packets");
    for counter in ["dropped-bad", "decapsulated", "dropped-not-adopted"] {
        assert_eq!(t.counter(&t.c, counter), 0, "C leaves frames for other hosts alone ({counter}; {flooded} flooded to it)");
    }
}
