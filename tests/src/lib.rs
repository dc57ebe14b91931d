//! Test hosts as network namespaces: a topology builder whose guard tears everything down,
//! a small TCP service for the servers, clients bound to chosen addresses, and a runner for the
//! `redirector` CLI. Used by the integration tests, the demo and the benchmarks.
//!
//! Addresses come from 198.18.0.0/15 and 2001:db8::/32 only, inside namespaces made here.

pub mod agents;
pub mod app;
pub mod crowd;
pub mod hook;
pub mod http;
pub mod io;
pub mod net;
pub mod packets;
pub mod peer;

pub use app::{Client, Server};
pub use net::{Host, Topology, in_netns};

/// Polls `cond` every 5 ms until it holds; fails the test, naming `what`, after `limit`.
pub fn wait_until(what: &str, limit: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether privileged tests can run. Without root: on CI (env `CI` set) this panics, elsewhere
/// it reports a skip (see [`skip`]) and the test returns.
#[must_use]
pub fn require_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must run the network-namespace tests as root");
    skip("network-namespace tests need root");
    false
}

/// Reports a test that could not run: "skipping: <why>" on stdout, and a line in the file named
/// by `REDIRECTOR_SKIP_LOG` (set by `cargo xtask test`, which fails on CI if any test skipped:
/// libtest hides the output of passing tests).
pub fn skip(why: &str) {
    println!("skipping: {why}");
    if let Some(path) = std::env::var_os("REDIRECTOR_SKIP_LOG") {
        use std::io::Write as _;
        let test = std::thread::current().name().unwrap_or("?").to_string();
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}
