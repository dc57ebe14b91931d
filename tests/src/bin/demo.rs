//! `cargo xtask demo`: builds a small network-namespace topology (a client host with several
//! client addresses, servers A and B on a bridge) and shows the kernel steering a client's new
//! connections from A to B while its open connection stays on A, then giving it back.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use redirector_tests::{
    Client, Server, Topology,
    net::{SERVICE4, client4},
};

fn step(n: u32, what: &str) {
    println!("\n[{n}] {what}");
}

fn show(t: &Topology, host: &redirector_tests::Host, label: &str, args: &[&str]) {
    println!("    $ redirector {}    # on {label}", args.join(" "));
    let out = t.redirector_ok(host, args);
    for l in out.lines() {
        println!("      {l}");
    }
}

fn requests(t: &Topology, clients: &[u16], svc: SocketAddr) -> Vec<(u16, String)> {
    clients
        .iter()
        .map(|&i| {
            let mut c = Client::connect(&t.client.ns, IpAddr::V4(client4(i)), svc);
            (i, c.who())
        })
        .collect()
}

fn print_requests(rs: &[(u16, String)], svc: SocketAddr) {
    for (i, who) in rs {
        println!("    client {} -> {svc}: served by {who}", client4(*i));
    }
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("error: the demo needs root (network namespaces, eBPF)");
        std::process::exit(1);
    }
    let hold = std::env::args().any(|a| a == "--hold");
    println!("redirector demo: servers A and B share load without a proxy.");
    step(1, "building the test network (namespaces, veth, a bridge; 198.18.0.0/15 only)");
    let t = Topology::new(6);
    let svc = SocketAddr::new(IpAddr::V4(SERVICE4), 80);
    let b_addr = SocketAddr::new(IpAddr::V4(t.b.v4[0]), 80);
    let _a = Server::start(&t.a.ns, "A", svc);
    let _b = Server::start(&t.b.ns, "B", b_addr);
    println!("    A: service {svc} (control address {}), B: {b_addr} (its own address only)", t.a.v4[0]);
    println!("    clients: {} .. {}", client4(1), client4(6));

    step(2, "before any rule, every client is served by A");
    print_requests(&requests(&t, &[1, 2, 3], svc), svc);
    let mut open = Client::connect(&t.client.ns, IpAddr::V4(client4(2)), svc);
    println!("    client {} also keeps a connection open: served by {}", client4(2), open.who());

    step(3, "B gets ready to serve A's service (accept A's tunnel, adopt the address with B's listener)");
    show(&t, &t.b, "B", &["sibling", "add", &t.a.v4[0].to_string(), "--dev", "eth0"]);
    show(&t, &t.b, "B", &["adopt", "add", &svc.to_string(), "--dev", "eth0", "--listener", &b_addr.to_string()]);
    step(4, "A steers its service and moves clients .1 and .2 to B (after probing B through the tunnel)");
    show(&t, &t.a, "A", &["service", "add", &svc.to_string(), "--dev", "eth0"]);
    show(&t, &t.a, "A", &["rule", "add", &client4(1).to_string(), "--to", &t.b.v4[0].to_string()]);
    show(&t, &t.a, "A", &["rule", "add", &client4(2).to_string(), "--to", &t.b.v4[0].to_string()]);
    show(&t, &t.a, "A", &["rule", "list"]);

    step(5, "new connections of moved clients are served by B; the client still talks to A's address");
    for (i, who) in requests(&t, &[1, 2, 3], svc) {
        let c = Client::connect(&t.client.ns, IpAddr::V4(client4(i)), svc);
        println!("    client {} -> {}: served by {who}", client4(i), c.peer());
    }
    println!("    the connection client {} opened before the rule: still served by {}", client4(2), open.who());

    step(6, "what the kernel decided (A, then B)");
    show(&t, &t.a, "A", &["stats"]);
    show(&t, &t.b, "B", &["stats"]);

    step(7, "A takes client .1 back gracefully (drain 2 s): new connections return to A");
    show(&t, &t.a, "A", &["rule", "del", &client4(1).to_string(), "--drain", "2"]);
    print_requests(&requests(&t, &[1], svc), svc);
    std::thread::sleep(Duration::from_millis(2200));
    show(&t, &t.a, "A", &["rule", "list"]);

    if hold {
        println!("\n--hold: topology kept until you press Enter (namespaces {}*)", t.prefix);
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    }
    println!("\ndone: the topology is removed now.");
}
