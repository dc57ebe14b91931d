//! An in-memory datapath: the state the kernel's maps would hold (the load per client, the
//! armed watermark, rules with their drains, adopted services), behind the same [`Plane`] as
//! the kernel's, for running many agents in one process (`cargo xtask bench cluster`). No
//! packet is steered: whoever drives it sets the load ([`Memory::set_load`]) and reads the
//! rules the agent installs ([`Memory::rules`]).
//!
//! Load events come as the kernel's do: once armed, the first load over the watermark queues
//! one and makes an eventfd readable, so an agent starts its round from the crossing itself.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd, RawFd},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use nix::sys::eventfd::{EfdFlags, EventFd};
use redirector_common::LoadEvent;

use super::{Events, LoadEventSource, Plane};
use crate::datapath::{Error, KernelLog, Listener, Load, Prefix, Result, RuleInfo, RuleState, Stats, monotonic_ns, unix_now};

/// A rule as the kernel keeps it.
#[derive(Clone, Copy, Debug)]
struct Rule {
    target: IpAddr,
    since_unix: u64,
    /// 0 while active; otherwise when its drain ends (`CLOCK_MONOTONIC` ns).
    drain_until_ns: u64,
    /// When it was installed (`CLOCK_MONOTONIC` ns).
    installed_ns: u64,
}

#[derive(Default)]
struct State {
    clients: BTreeMap<IpAddr, u64>,
    armed: Option<u64>,
    events: VecDeque<LoadEvent>,
    rules: BTreeMap<Prefix, Rule>,
    /// Adopted services, and whether their listener is registered.
    adopted: BTreeMap<(IpAddr, u16), bool>,
    siblings: HashSet<IpAddr>,
    frozen: HashSet<(SocketAddr, SocketAddr)>,
    events_taken: bool,
}

impl State {
    fn total(&self) -> u64 {
        self.clients.values().sum()
    }
}

struct Shared {
    state: Mutex<State>,
    /// Readable while events wait.
    wake: EventFd,
}

/// One node's in-memory datapath; clones share it (the agent's change and read handles, and
/// whoever drives the load).
#[derive(Clone)]
pub struct Memory(Arc<Shared>);

impl Memory {
    /// An empty datapath: no load, no rules.
    ///
    /// # Errors
    /// No eventfd could be made.
    pub fn new() -> Result<Self> {
        let wake = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(|e| Error::io("making an eventfd", e.into()))?;
        Ok(Self(Arc::new(Shared { state: Mutex::new(State::default()), wake })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().expect("in-memory datapath lock")
    }

    /// Sets the established connections per client (clients left out have none); reports a
    /// crossing of the armed watermark as the kernel would.
    pub fn set_load(&self, clients: impl IntoIterator<Item = (IpAddr, u64)>) {
        let mut st = self.state();
        st.clients = clients.into_iter().filter(|(_, n)| *n > 0).collect();
        let total = st.total();
        if st.armed.is_some_and(|high| total > high) {
            st.armed = None;
            st.events.push_back(LoadEvent { at_ns: monotonic_ns(), total });
            // A full counter only means it stays readable.
            let _ = self.0.wake.write(1);
        }
    }

    /// The established connections in total.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.state().total()
    }

    /// The rules, as the kernel would list them.
    #[must_use]
    pub fn rules(&self) -> Vec<RuleInfo> {
        let now = monotonic_ns();
        self.state().rules.iter().map(|(p, r)| info(*p, r, now)).collect()
    }

    /// When each rule was installed (`CLOCK_MONOTONIC` ns), by prefix.
    #[must_use]
    pub fn installed_ns(&self) -> Vec<(Prefix, u64)> {
        self.state().rules.iter().map(|(p, r)| (*p, r.installed_ns)).collect()
    }

    /// The adopted services.
    #[must_use]
    pub fn adopted(&self) -> Vec<(IpAddr, u16)> {
        self.state().adopted.keys().copied().collect()
    }
}

fn info(prefix: Prefix, r: &Rule, now_ns: u64) -> RuleInfo {
    let (state, drain_left_ms) = match r.drain_until_ns {
        0 => (RuleState::Active, 0),
        until if until > now_ns => (RuleState::Draining, (until - now_ns) / 1_000_000),
        _ => (RuleState::Drained, 0),
    };
    RuleInfo { prefix, target: r.target, state, drain_left_ms, since_unix: r.since_unix }
}

fn no_kernel(what: &str) -> Error {
    Error::invalid(format!("{what}: the in-memory datapath has no kernel programs"))
}

/// The load events of a [`Memory`].
struct MemoryEvents(Memory);

impl LoadEventSource for MemoryEvents {
    fn next_event(&mut self) -> Option<LoadEvent> {
        let mut st = self.0.state();
        let ev = st.events.pop_front();
        if st.events.is_empty() {
            // Not readable again until the next event (nothing to read is not an error).
            let _ = self.0.0.wake.read();
        }
        ev
    }
}

impl AsRawFd for MemoryEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.wake.as_fd().as_raw_fd()
    }
}

impl Plane for Memory {
    fn blocks(&self) -> bool {
        false
    }

    fn load(&mut self) -> Result<Load> {
        let st = self.state();
        let mut clients: Vec<(IpAddr, u64)> = st.clients.iter().map(|(a, n)| (*a, *n)).collect();
        clients.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(Load { total: st.total(), clients })
    }

    fn take_load_events(&mut self) -> Result<Events> {
        let mut st = self.state();
        if std::mem::replace(&mut st.events_taken, true) {
            return Err(Error::invalid("load events already taken"));
        }
        Ok(Events(Box::new(MemoryEvents(self.clone()))))
    }

    fn arm_load_event(&mut self, high: u64) -> Result<()> {
        self.state().armed = Some(high);
        Ok(())
    }

    fn take_kernel_log(&mut self) -> Result<KernelLog> {
        Err(no_kernel("the kernel programs' log"))
    }

    fn stats(&mut self) -> Result<Stats> {
        Ok(Stats { counters: Vec::new() })
    }

    fn ingress_attached_to(&self, _ifname: &str) -> Result<bool> {
        Ok(true)
    }

    fn listener_inode(&self, _listener: (IpAddr, u16)) -> Result<u64> {
        // One listener that never changes: registered once.
        Ok(1)
    }

    fn list_rules(&mut self) -> Result<Vec<RuleInfo>> {
        Ok(self.rules())
    }

    fn migrate_many(&mut self, prefixes: &[Prefix], target: IpAddr, _probe: Option<Duration>, replace: bool) -> Result<()> {
        if let Some(p) = prefixes.iter().find(|p| p.addr.is_ipv4() != target.is_ipv4()) {
            return Err(Error::invalid(format!("target {target} and prefix {p} are of different families")));
        }
        let mut st = self.state();
        // As the kernel's: a rule to `target` stays (draining: active again); one elsewhere is
        // refused unless `replace`; all or nothing.
        if !replace && let Some(p) = prefixes.iter().find(|p| st.rules.get(p).is_some_and(|r| r.target != target)) {
            return Err(Error::invalid(format!("{p} is already migrated elsewhere")));
        }
        let (now, since_unix) = (monotonic_ns(), unix_now());
        for p in prefixes {
            match st.rules.get_mut(p) {
                Some(r) if r.target == target => r.drain_until_ns = 0,
                _ => drop(st.rules.insert(*p, Rule { target, since_unix, drain_until_ns: 0, installed_ns: now })),
            }
        }
        Ok(())
    }

    fn probe_target(&mut self, _target: IpAddr, _timeout: Duration) -> Result<()> {
        Ok(())
    }

    fn drain_many(&mut self, prefixes: &[Prefix], period: Duration) -> Result<usize> {
        let mut st = self.state();
        if period.is_zero() {
            return Ok(prefixes.iter().filter(|p| st.rules.remove(p).is_some()).count());
        }
        let until = monotonic_ns().saturating_add(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX));
        let mut n = 0;
        for p in prefixes {
            if let Some(r) = st.rules.get_mut(p) {
                r.drain_until_ns = if r.drain_until_ns == 0 { until } else { r.drain_until_ns.min(until) };
                n += 1;
            }
        }
        Ok(n)
    }

    fn collect_drained(&mut self) -> Result<usize> {
        let now = monotonic_ns();
        let mut st = self.state();
        let before = st.rules.len();
        st.rules.retain(|_, r| r.drain_until_ns == 0 || r.drain_until_ns > now);
        Ok(before - st.rules.len())
    }

    fn freeze(&mut self, flows: &[(SocketAddr, SocketAddr)], _max: Duration) -> Result<()> {
        self.state().frozen.extend(flows.iter().copied());
        Ok(())
    }

    fn thaw(&mut self, flows: &[(SocketAddr, SocketAddr)]) -> Result<()> {
        let mut st = self.state();
        for f in flows {
            st.frozen.remove(f);
        }
        Ok(())
    }

    fn add_sibling(&mut self, sibling: IpAddr, _ifname: &str) -> Result<()> {
        if sibling.is_unspecified() || sibling.is_multicast() {
            return Err(Error::invalid(format!("sibling {sibling} is not a unicast address")));
        }
        self.state().siblings.insert(sibling);
        Ok(())
    }

    fn adopt(&mut self, service: (IpAddr, u16), _ifname: &str, listener: Option<Listener>, _mtu: Option<u32>) -> Result<()> {
        let mut st = self.state();
        let registered = st.adopted.get(&service).copied().unwrap_or(false) || listener.is_some();
        st.adopted.insert(service, registered);
        Ok(())
    }

    fn register_listener(&mut self, service: (IpAddr, u16), _listener: Listener) -> Result<()> {
        let mut st = self.state();
        let Some(registered) = st.adopted.get_mut(&service) else {
            return Err(Error::invalid(format!("{}:{} is not adopted", service.0, service.1)));
        };
        *registered = true;
        Ok(())
    }

    fn unadopt(&mut self, service: (IpAddr, u16)) -> Result<()> {
        self.state().adopted.remove(&service);
        Ok(())
    }

    fn list_adopted(&mut self) -> Result<Vec<(IpAddr, u16, bool)>> {
        Ok(self.state().adopted.iter().map(|((a, p), r)| (*a, *p, *r)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Prefix {
        let addr: IpAddr = s.parse().unwrap();
        Prefix { addr, len: if addr.is_ipv4() { 32 } else { 128 } }
    }

    #[test]
    fn a_crossing_of_the_armed_watermark_is_reported_once_until_armed_again() {
        let mut m = Memory::new().unwrap();
        let mut events = m.take_load_events().unwrap();
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        m.set_load([(a, 10)]);
        assert!(events.next_event().is_none(), "nothing armed, nothing reported");
        m.arm_load_event(10).unwrap();
        m.set_load([(a, 10)]);
        assert!(events.next_event().is_none(), "at the watermark is not over it");
        m.set_load([(a, 11)]);
        let ev = events.next_event().expect("the crossing");
        assert_eq!(ev.total, 11);
        m.set_load([(a, 12)]);
        assert!(events.next_event().is_none(), "disarmed by its report");
        assert!(m.take_load_events().is_err(), "taken once");
    }

    #[test]
    fn rules_drain_and_are_collected_as_the_kernels_are() {
        let mut m = Memory::new().unwrap();
        let (a, b) = (host("198.18.0.1"), host("198.18.0.2"));
        let to: IpAddr = "198.18.1.1".parse().unwrap();
        m.migrate_many(&[a, b], to, None, false).unwrap();
        assert!(m.migrate_many(&[a], "198.18.1.2".parse().unwrap(), None, false).is_err(), "steered elsewhere already");
        assert!(m.migrate_many(&[host("2001:db8::1")], to, None, false).is_err(), "families differ");
        assert_eq!(m.drain_many(&[a], Duration::from_mins(1)).unwrap(), 1);
        assert_eq!(m.drain_many(&[b], Duration::ZERO).unwrap(), 1, "a zero period releases at once");
        let rules = m.list_rules().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].state, RuleState::Draining);
        assert_eq!(m.collect_drained().unwrap(), 0, "still draining");
    }
}
