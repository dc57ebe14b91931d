//! What the agent needs of a datapath, as one interface: the kernel's ([`Datapath`], what
//! every node runs and the netns tests test) or an in-memory one ([`memory`]) that lets
//! `cargo xtask bench cluster` run a thousand agents in one process with their real
//! membership, negotiation and hand-over code.

pub mod memory;

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use redirector_common::LoadEvent;

use crate::datapath::{Datapath, KernelLog, Listener, Load, LoadEvents, Prefix, Result, RuleInfo, Stats};

/// The load's crossings of the armed watermark, as they come: readable on its fd when one is
/// waiting.
pub trait LoadEventSource: AsRawFd + Send {
    /// The next event, if one is waiting.
    fn next_event(&mut self) -> Option<LoadEvent>;
}

/// A datapath's [`LoadEventSource`], watched for readability by the agent.
pub struct Events(pub Box<dyn LoadEventSource>);

impl Events {
    /// The next event, if one is waiting.
    pub fn next_event(&mut self) -> Option<LoadEvent> {
        self.0.next_event()
    }
}

impl AsRawFd for Events {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl LoadEventSource for LoadEvents {
    fn next_event(&mut self) -> Option<LoadEvent> {
        LoadEvents::next_event(self)
    }
}

/// The datapath's operations the agent uses; see the kernel's [`Datapath`] for what each does.
pub trait Plane: Send {
    /// Whether calls may block (the kernel's: a probe waits up to a second, map scans take
    /// milliseconds): the agent then makes them on blocking threads; otherwise on its tasks.
    fn blocks(&self) -> bool {
        true
    }
    fn load(&mut self) -> Result<Load>;
    fn take_load_events(&mut self) -> Result<Events>;
    fn arm_load_event(&mut self, high: u64) -> Result<()>;
    fn take_kernel_log(&mut self) -> Result<KernelLog>;
    fn stats(&mut self) -> Result<Stats>;
    fn ingress_attached_to(&self, ifname: &str) -> Result<bool>;
    /// The inode of the listening socket at `listener` (it changes when the application
    /// listens again).
    fn listener_inode(&self, listener: (IpAddr, u16)) -> Result<u64>;
    // Origin: rules.
    fn list_rules(&mut self) -> Result<Vec<RuleInfo>>;
    fn migrate_many(&mut self, prefixes: &[Prefix], target: IpAddr, probe: Option<Duration>, replace: bool) -> Result<()>;
    fn probe_target(&mut self, target: IpAddr, timeout: Duration) -> Result<()>;
    fn drain_many(&mut self, prefixes: &[Prefix], period: Duration) -> Result<usize>;
    fn collect_drained(&mut self) -> Result<usize>;
    // Connections moving live.
    fn freeze(&mut self, flows: &[(SocketAddr, SocketAddr)], max: Duration) -> Result<()>;
    fn thaw(&mut self, flows: &[(SocketAddr, SocketAddr)]) -> Result<()>;
    // Target: siblings and adopted services.
    fn add_sibling(&mut self, sibling: IpAddr, ifname: &str) -> Result<()>;
    fn adopt(&mut self, service: (IpAddr, u16), ifname: &str, listener: Option<Listener>, mtu: Option<u32>) -> Result<()>;
    fn register_listener(&mut self, service: (IpAddr, u16), listener: Listener) -> Result<()>;
    fn unadopt(&mut self, service: (IpAddr, u16)) -> Result<()>;
    fn list_adopted(&mut self) -> Result<Vec<(IpAddr, u16, bool)>>;
}

impl Plane for Datapath {
    fn load(&mut self) -> Result<Load> {
        Datapath::load(self)
    }
    fn take_load_events(&mut self) -> Result<Events> {
        Ok(Events(Box::new(Datapath::take_load_events(self)?)))
    }
    fn arm_load_event(&mut self, high: u64) -> Result<()> {
        Datapath::arm_load_event(self, high)
    }
    fn take_kernel_log(&mut self) -> Result<KernelLog> {
        Datapath::take_kernel_log(self)
    }
    fn stats(&mut self) -> Result<Stats> {
        Datapath::stats(self)
    }
    fn ingress_attached_to(&self, ifname: &str) -> Result<bool> {
        Datapath::ingress_attached_to(self, ifname)
    }
    fn listener_inode(&self, listener: (IpAddr, u16)) -> Result<u64> {
        crate::datapath::listener_inode(listener)
    }
    fn list_rules(&mut self) -> Result<Vec<RuleInfo>> {
        Datapath::list_rules(self)
    }
    fn migrate_many(&mut self, prefixes: &[Prefix], target: IpAddr, probe: Option<Duration>, replace: bool) -> Result<()> {
        Datapath::migrate_many(self, prefixes, target, probe, replace)
    }
    fn probe_target(&mut self, target: IpAddr, timeout: Duration) -> Result<()> {
        Datapath::probe_target(self, target, timeout)
    }
    fn drain_many(&mut self, prefixes: &[Prefix], period: Duration) -> Result<usize> {
        Datapath::drain_many(self, prefixes, period)
    }
    fn collect_drained(&mut self) -> Result<usize> {
        Datapath::collect_drained(self)
    }
    fn freeze(&mut self, flows: &[(SocketAddr, SocketAddr)], max: Duration) -> Result<()> {
        Datapath::freeze(self, flows, max)
    }
    fn thaw(&mut self, flows: &[(SocketAddr, SocketAddr)]) -> Result<()> {
        Datapath::thaw(self, flows)
    }
    fn add_sibling(&mut self, sibling: IpAddr, ifname: &str) -> Result<()> {
        Datapath::add_sibling(self, sibling, ifname)
    }
    fn adopt(&mut self, service: (IpAddr, u16), ifname: &str, listener: Option<Listener>, mtu: Option<u32>) -> Result<()> {
        Datapath::adopt(self, service, ifname, listener, mtu)
    }
    fn register_listener(&mut self, service: (IpAddr, u16), listener: Listener) -> Result<()> {
        Datapath::register_listener(self, service, listener)
    }
    fn unadopt(&mut self, service: (IpAddr, u16)) -> Result<()> {
        Datapath::unadopt(self, service)
    }
    fn list_adopted(&mut self) -> Result<Vec<(IpAddr, u16, bool)>> {
        Datapath::list_adopted(self)
    }
}
