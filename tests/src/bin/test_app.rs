//! `redirector-test-app NAME ADDR`: the line-protocol test service as its own process (so it
//! can live in a cgroup whose connections the kernel counts). Runs until stdin closes.

use std::net::SocketAddr;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, addr] = args.as_slice() else {
        eprintln!("usage: redirector-test-app NAME ADDR");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().unwrap_or_else(|e| {
        eprintln!("bad address {addr}: {e}");
        std::process::exit(2);
    });
    let server = redirector_tests::app::Server::start_here(name, addr);
    eprintln!("listening on {addr} as {name}");
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    drop(server);
}
