//! Test hosts as network namespaces: a topology builder whose guard tears everything down,
//! a small TCP service for the servers, clients bound to chosen addresses, and a runner for the
//! `redirector` CLI. Used by the integration tests, the demo and the benchmarks.
//!
//! Addresses come from 198.18.0.0/15 and 2001:db8::/32 only, inside namespaces made here.

pub mod agents;
pub mod app;
pub mod http;
pub mod net;
pub mod packets;
pub mod peer;

pub use app::{Client, Server};
pub use net::{Host, Topology, in_netns};

/// Whether privileged tests can run. Without root: on CI (env `CI` set) this panics, elsewhere
/// it says "skipping: …" and the test returns.
#[must_use]
pub fn require_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must run the network-namespace tests as root");
    println!("skipping: network-namespace tests need root");
    false
}
