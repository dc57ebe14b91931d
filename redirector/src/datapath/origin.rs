//! The origin's side: steered services, the rules that migrate clients to targets, and their
//! drain; the slot tables kept in line with them.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    net::IpAddr,
    time::Duration,
};

use aya::maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie::Key};
use redirector_common::{PortData, RuleValue, SERVICE_LIVE_MOVES, SERVICE_XDP, ServiceKey, ServiceValue, as_v4, decide, maps};

use super::{
    Datapath, Error, Prefix, Result, RuleInfo, ServiceInfo, family_name, monotonic_ns, net, probe,
    slots::{self, Want},
    types, unix_now,
};

impl Datapath {
    /// The rule trie of the family whose addresses have `N` bytes.
    fn trie<const N: usize>(&mut self) -> Result<LpmTrie<&mut MapData, [u8; N], RuleValue>> {
        self.open_map(trie_name(N))
    }

    /// The rules of single addresses of the family whose addresses have `N` bytes.
    fn host_rules<const N: usize>(&mut self) -> Result<HashMap<&mut MapData, [u8; N], RuleValue>> {
        self.open_map(host_rules_name(N))
    }

    fn services(&mut self) -> Result<HashMap<&mut MapData, ServiceKey, ServiceValue>> {
        self.open_map(maps::SERVICES)
    }

    /// Steers `service` (this host's service address and port): attaches the classifier to
    /// `ifname` and records how to tunnel the service's packets; the XDP fast path leaves it to
    /// the classifier ([`Datapath::add_service_xdp`] without `xdp`).
    pub fn add_service(&mut self, service: (IpAddr, u16), ifname: &str, tunnel_src: Option<IpAddr>, mtu: Option<u32>) -> Result<ServiceInfo> {
        self.add_service_xdp(service, ifname, tunnel_src, mtu, false)
    }

    /// [`Datapath::add_service`], and with `xdp`, the XDP fast path
    /// on `ifname` forwards its migrated clients' packets too, if the interface can run it
    /// (native XDP, forwarding on): otherwise the classifier alone steers it, and
    /// [`ServiceInfo::xdp_unavailable`] says why. Without, the fast path leaves the service to
    /// the classifier (and leaves the interface once no service asks for it).
    pub fn add_service_xdp(&mut self, service: (IpAddr, u16), ifname: &str, tunnel_src: Option<IpAddr>, mtu: Option<u32>, xdp: bool) -> Result<ServiceInfo> {
        let (addr, port) = service;
        if port == 0 {
            return Err(Error::invalid("service port must not be 0"));
        }
        if addr.is_unspecified() || addr.is_multicast() {
            return Err(Error::invalid(format!("service address {addr} is not a unicast address")));
        }
        let ifindex = net::ifindex(ifname)?;
        let tunnel_src = match tunnel_src {
            Some(t) if t.is_ipv4() != addr.is_ipv4() => {
                return Err(Error::invalid(format!("tunnel source {t} and service {addr} are of different families")));
            }
            Some(t) => t,
            None => net::control_address(ifname, addr)?,
        };
        let mtu = match mtu {
            Some(m) => m,
            None => net::mtu(ifname)?,
        };
        let mut value = ServiceValue { tunnel_src: types::to16(tunnel_src), mss_clamp: decide::mss_clamp(mtu, addr.is_ipv6()), flags: 0, _pad: 0, ifindex };
        let _lock = self.lock()?;
        self.attach_ingress(ifname, false)?;
        let xdp_unavailable = if xdp { self.xdp_for(ifname, addr.is_ipv6()).err() } else { None };
        if xdp && xdp_unavailable.is_none() {
            value.flags |= SERVICE_XDP;
        }
        let key = ServiceKey::new(types::to16(addr), port);
        self.services()?.insert(key, value, 0).map_err(|e| Error::bpf(format!("adding service {}", types::sock(addr, port)), e))?;
        self.sync_ports()?;
        self.sync_xdp()?;
        Ok(ServiceInfo { addr, port, tunnel_src, mss_clamp: value.mss_clamp, ifindex, xdp: value.flags & SERVICE_XDP != 0, xdp_unavailable })
    }

    /// Attaches the XDP fast path to `ifname` for a service of the family (`v6`), or says why
    /// it cannot run there.
    fn xdp_for(&mut self, ifname: &str, v6: bool) -> Result<(), String> {
        let family = family_name(!v6);
        match net::forwarding(ifname, v6) {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "the XDP fast path needs {ifname} to forward {family} (sysctl net.ipv{}.conf.{ifname}.forwarding=1): bpf_fib_lookup, which finds the next hop, answers nowhere else",
                    if v6 { 6 } else { 4 }
                ));
            }
            Err(e) => return Err(format!("the XDP fast path cannot check {ifname}: {e}")),
        }
        self.attach_xdp(ifname, false).map(|_| ()).map_err(|e| {
            let cause = std::error::Error::source(&e).map(|s| format!(" ({s})")).unwrap_or_default();
            format!("{e}{cause}")
        })
    }

    /// Detaches the XDP fast path from interfaces where no steered service asks for it.
    fn sync_xdp(&mut self) -> Result<()> {
        let wanted: Vec<u32> = self.service_entries()?.iter().filter(|(_, v)| v.flags & SERVICE_XDP != 0).map(|(_, v)| v.ifindex).collect();
        for ifindex in self.xdp_interfaces()? {
            if !wanted.contains(&ifindex) {
                self.detach_xdp(ifindex)?;
            }
        }
        Ok(())
    }

    /// Whether `service`'s connections can move live ([`redirector_common::SERVICE_LIVE_MOVES`]):
    /// its SYN-ACKs then announce an MSS that fits the tunnel, lowered by the egress program
    /// on its interface ([`Datapath::attach_egress`]). Applies to connections made from now on.
    pub fn set_live_moves(&mut self, service: (IpAddr, u16), on: bool) -> Result<()> {
        let _lock = self.lock()?;
        let key = ServiceKey::new(types::to16(service.0), service.1);
        let mut services = self.services()?;
        let mut value = services.get(&key, 0).map_err(|e| match e {
            MapError::KeyNotFound => Error::invalid(format!("service {} is not steered", types::sock(service.0, service.1))),
            e => Error::bpf("reading service", e),
        })?;
        value.flags = if on { value.flags | SERVICE_LIVE_MOVES } else { value.flags & !SERVICE_LIVE_MOVES };
        services.insert(key, value, 0).map_err(|e| Error::bpf("updating service", e))?;
        self.sync_ports()
    }

    /// Stops steering `service`. Rules stay (they apply to every steered service).
    pub fn del_service(&mut self, service: (IpAddr, u16)) -> Result<()> {
        let _lock = self.lock()?;
        let key = ServiceKey::new(types::to16(service.0), service.1);
        self.services()?.remove(&key).map_err(|e| match e {
            MapError::KeyNotFound => Error::invalid(format!("service {} is not steered", types::sock(service.0, service.1))),
            e => Error::bpf("removing service", e),
        })?;
        self.sync_ports()?;
        self.sync_xdp()
    }

    /// Brings `PORT_SLOTS_*` in line with `SERVICES`: a port with one service (of the table's
    /// family) holds it, a port with several sends the classifier to `SERVICES`.
    pub(super) fn sync_ports(&mut self) -> Result<()> {
        let entries = self.service_entries()?;
        for v6 in [false, true] {
            let mut wanted: BTreeMap<u32, Want<PortData>> = BTreeMap::new();
            for (k, v) in entries.iter().filter(|(k, _)| as_v4(&k.addr).is_none() == v6) {
                let one = Want::One(PortData { addr: k.addr, service: *v });
                wanted.entry(u32::from(k.port())).and_modify(|w| *w = Want::Many).or_insert(one);
            }
            if v6 { &self.ports_v6 } else { &self.ports_v4 }.apply(&wanted);
        }
        Ok(())
    }

    /// Brings `HOSTS_V4` and `HOSTS_V6` in line with `rules` (all rules of the instance).
    fn sync_hosts(&mut self, rules: &[(Prefix, RuleValue)]) {
        self.hosts_v4.apply(&slots::want_hosts(rules, false));
        self.hosts_v6.apply(&slots::want_hosts(rules, true));
    }

    /// Every entry of `SERVICES`, as stored.
    fn service_entries(&mut self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        let map = self.services()?;
        map.iter().map(|item| item.map_err(|e| Error::bpf("reading SERVICES", e))).collect()
    }

    /// Steered services.
    pub fn list_services(&mut self) -> Result<Vec<ServiceInfo>> {
        let mut out = Vec::new();
        for (k, v) in self.service_entries()? {
            out.push(ServiceInfo {
                addr: types::from16(&k.addr),
                port: k.port(),
                tunnel_src: types::from16(&v.tunnel_src),
                mss_clamp: v.mss_clamp,
                ifindex: v.ifindex,
                xdp: v.flags & SERVICE_XDP != 0,
                xdp_unavailable: None,
            });
        }
        out.sort_by_key(|s| (s.addr, s.port));
        Ok(out)
    }

    /// Migrates the clients of `prefix` to `target`: their new connections to every steered
    /// service of the family go there. With `probe`, the target must first answer a probe
    /// through the real tunnel for each such service (make before break).
    pub fn migrate(&mut self, prefix: Prefix, target: IpAddr, probe: Option<Duration>) -> Result<()> {
        self.migrate_many(&[prefix], target, probe, false)
    }

    /// [`Datapath::migrate`] for many prefixes to one target: one probe, then every rule, all or
    /// nothing. A prefix already migrated to `target` stays (a draining one becomes active
    /// again); one migrated elsewhere is refused unless `replace` (its flows living on the
    /// other target would break).
    pub fn migrate_many(&mut self, prefixes: &[Prefix], target: IpAddr, probe: Option<Duration>, replace: bool) -> Result<()> {
        if let Some(p) = prefixes.iter().find(|p| p.addr.is_ipv4() != target.is_ipv4()) {
            return Err(Error::invalid(format!("target {target} and prefix {p} are of different families")));
        }
        // The probe runs before the lock: it can take up to its timeout per service.
        match probe {
            Some(timeout) => self.probe_target(target, timeout)?,
            None => {
                self.steered_services(target)?;
            }
        }
        let _lock = self.lock()?;
        let target16 = types::to16(target);
        let now = unix_now();
        let mut tries = None;
        let mut changes: Vec<Change> = Vec::new();
        for p in unique(prefixes) {
            let old = self.stored_rule(p, &mut tries)?;
            let value = match old {
                Some(old) if old.target == target16 && old.drain_until_ns == 0 => continue,
                Some(old) if old.target == target16 => RuleValue { drain_until_ns: 0, ..old },
                Some(old) if !replace => {
                    return Err(Error::invalid(format!(
                        "{p} is already migrated to {}{}: withdraw it first (`rule del`), or replace it (its flows living there break)",
                        types::from16(&old.target),
                        if old.drain_until_ns == 0 { "" } else { " (draining)" }
                    )));
                }
                _ => RuleValue { target: target16, drain_until_ns: 0, since_unix: now },
            };
            changes.push((p, old, Some(value)));
        }
        self.change_rules(&changes)
    }

    /// The steered services of `target`'s family (an error if there is none, or `target` is
    /// not a unicast address).
    fn steered_services(&mut self, target: IpAddr) -> Result<Vec<ServiceInfo>> {
        if target.is_unspecified() || target.is_multicast() || target.is_loopback() {
            return Err(Error::invalid(format!("target {target} is not a unicast address")));
        }
        let services: Vec<ServiceInfo> = self.list_services()?.into_iter().filter(|s| s.addr.is_ipv4() == target.is_ipv4()).collect();
        if services.is_empty() {
            return Err(Error::invalid(format!("no steered {} service: add one with `redirector service add` first", family_name(target.is_ipv4()))));
        }
        Ok(services)
    }

    /// Probes `target` through the real tunnel, for every steered service of its family: Ok
    /// once its listener answered each (its datapath serves those services; a reset means
    /// nothing listens there, silence that the target is not ready or gone).
    pub fn probe_target(&mut self, target: IpAddr, timeout: Duration) -> Result<()> {
        for s in &self.steered_services(target)? {
            let mut probes: HashMap<&mut MapData, u32, redirector_common::ProbeValue> = self.open_map(maps::PROBES)?;
            probe::probe(&mut probes, s, target, timeout)?;
        }
        Ok(())
    }

    /// The rule of `prefix` as stored: a single address's from its hash map, a prefix's from
    /// `tries` (both tries' rules, read on first need: a trie lookup finds the longest prefix
    /// that matches, not the one asked for).
    fn stored_rule(&mut self, prefix: Prefix, tries: &mut Option<StdHashMap<Prefix, RuleValue>>) -> Result<Option<RuleValue>> {
        let found = match prefix.addr {
            IpAddr::V4(a) if prefix.is_host() => self.host_rules()?.get(&a.octets(), 0),
            IpAddr::V6(a) if prefix.is_host() => self.host_rules()?.get(&a.octets(), 0),
            _ => {
                if tries.is_none() {
                    let mut all = self.trie_rules::<4>()?;
                    all.extend(self.trie_rules::<16>()?);
                    *tries = Some(all.into_iter().collect());
                }
                return Ok(tries.as_ref().and_then(|t| t.get(&prefix).copied()));
            }
        };
        match found {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(Error::bpf(format!("reading the rule of {prefix}"), e)),
        }
    }

    /// Makes the rules of `changes` their new values (`None`: removed), then the host slots,
    /// all or nothing: what a failure leaves half done is put back.
    fn change_rules(&mut self, changes: &[Change]) -> Result<()> {
        let mut done: Previous = Vec::new();
        for (p, old, new) in changes {
            let written = match new {
                Some(v) => self.insert_rule(*p, *v),
                None => self.remove_rule(*p),
            };
            if let Err(e) = written {
                self.restore(&done);
                return Err(e);
            }
            done.push((*p, *old));
        }
        self.sync_changed(changes)
    }

    /// Brings the host tables in line after `changes`: from every rule if a prefix changed
    /// (it covers many slots), else only the slots of the changed addresses, from what they
    /// hold (reading every rule takes milliseconds with a million of them, or none: the hash
    /// maps' batch read walks all their buckets; a move waits for its rules).
    fn sync_changed(&mut self, changes: &[Change]) -> Result<()> {
        if changes.iter().any(|(p, ..)| !p.is_host()) {
            let all = self.rules()?;
            self.sync_hosts(&all);
            return Ok(());
        }
        for v6 in [false, true] {
            let of: Vec<(redirector_common::Addr, Option<RuleValue>)> =
                changes.iter().filter(|(p, ..)| p.addr.is_ipv6() == v6).map(|(p, _, new)| (types::to16(p.addr), *new)).collect();
            if !of.is_empty() {
                let table = if v6 { &self.hosts_v6 } else { &self.hosts_v4 };
                table.apply_some(&slots::host_changes(|i| table.get(i), &of));
            }
        }
        Ok(())
    }

    /// Puts back what a failed call changed.
    fn restore(&mut self, previous: &Previous) {
        for (p, old) in previous.iter().rev() {
            let _ = match old {
                Some(v) => self.insert_rule(*p, *v),
                None => self.remove_rule(*p),
            };
        }
    }

    /// A single address's rule goes to its hash map, a prefix's to the trie.
    fn insert_rule(&mut self, prefix: Prefix, value: RuleValue) -> Result<()> {
        let len = u32::from(prefix.len);
        match prefix.addr {
            IpAddr::V4(a) if prefix.len == 32 => self.host_rules()?.insert(a.octets(), value, 0),
            IpAddr::V6(a) if prefix.len == 128 => self.host_rules()?.insert(a.octets(), value, 0),
            IpAddr::V4(a) => self.trie()?.insert(&Key::new(len, a.octets()), value, 0),
            IpAddr::V6(a) => self.trie()?.insert(&Key::new(len, a.octets()), value, 0),
        }
        .map_err(|e| Error::bpf(format!("installing rule {prefix}"), e))
    }

    fn remove_rule(&mut self, prefix: Prefix) -> Result<()> {
        let len = u32::from(prefix.len);
        match prefix.addr {
            IpAddr::V4(a) if prefix.len == 32 => self.host_rules::<4>()?.remove(&a.octets()),
            IpAddr::V6(a) if prefix.len == 128 => self.host_rules::<16>()?.remove(&a.octets()),
            IpAddr::V4(a) => self.trie()?.remove(&Key::new(len, a.octets())),
            IpAddr::V6(a) => self.trie()?.remove(&Key::new(len, a.octets())),
        }
        .map_err(|e| match e {
            MapError::KeyNotFound => Error::invalid(format!("no rule for {prefix}")),
            e => Error::bpf(format!("removing rule {prefix}"), e),
        })
    }

    /// Every rule of both families, as stored.
    fn rules(&mut self) -> Result<Vec<(Prefix, RuleValue)>> {
        let mut out = self.trie_rules::<4>()?;
        out.extend(self.trie_rules::<16>()?);
        out.extend(self.host_rule_entries::<4>()?);
        out.extend(self.host_rule_entries::<16>()?);
        Ok(out)
    }

    /// Every rule of a single address of the family whose addresses have `N` bytes.
    fn host_rule_entries<const N: usize>(&mut self) -> Result<Vec<(Prefix, RuleValue)>>
    where
        IpAddr: From<[u8; N]>,
    {
        let len = u8::try_from(N * 8).unwrap_or(u8::MAX);
        let name = host_rules_name(N);
        let aya::maps::Map::HashMap(map) = self.map(name)? else {
            return Err(Error::invalid(format!("{name} is not a hash map")));
        };
        let entries = super::batch::read_all::<[u8; N], RuleValue>(map, name)?;
        Ok(entries.into_iter().map(|(k, v)| (Prefix { addr: IpAddr::from(k), len }, v)).collect())
    }

    /// Every rule of the trie of `N`-byte addresses, as stored.
    fn trie_rules<const N: usize>(&mut self) -> Result<Vec<(Prefix, RuleValue)>>
    where
        IpAddr: From<[u8; N]>,
    {
        let full = u8::try_from(N * 8).unwrap_or(u8::MAX);
        let mut out = Vec::new();
        for item in &self.trie::<N>()? {
            let (k, v) = item.map_err(|e| Error::bpf(format!("reading {}", trie_name(N)), e))?;
            let len = u8::try_from(k.prefix_len()).unwrap_or(full);
            out.push((Prefix { addr: IpAddr::from(k.data()), len }, v));
        }
        Ok(out)
    }

    /// Withdraws the rule for `prefix` gracefully: for `period`, new connections stay here while
    /// packets of flows living on the target still go there; then the rule is inert and removed
    /// by the next `collect_drained` (the agent runs it every few seconds, every command on open).
    pub fn drain(&mut self, prefix: Prefix, period: Duration) -> Result<()> {
        if self.drain_many(&[prefix], period)? == 0 {
            return Err(Error::invalid(format!("no rule for {prefix}")));
        }
        Ok(())
    }

    /// [`Datapath::drain`] for many prefixes at once (those without a rule are skipped).
    /// Returns how many rules drain now.
    pub fn drain_many(&mut self, prefixes: &[Prefix], period: Duration) -> Result<usize> {
        if period.is_zero() {
            return self.release_many(prefixes);
        }
        let _lock = self.lock()?;
        let until = monotonic_ns().saturating_add(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX));
        let mut tries = None;
        let mut changes: Vec<Change> = Vec::new();
        for p in unique(prefixes) {
            let Some(old) = self.stored_rule(p, &mut tries)? else { continue };
            let value = RuleValue { drain_until_ns: if old.drain_until_ns == 0 { until } else { old.drain_until_ns.min(until) }, ..old };
            changes.push((p, Some(old), Some(value)));
        }
        self.change_rules(&changes)?;
        Ok(changes.len())
    }

    /// Removes the rule for `prefix` at once: flows living on the target break.
    pub fn release(&mut self, prefix: Prefix) -> Result<()> {
        if self.release_many(&[prefix])? == 0 {
            return Err(Error::invalid(format!("no rule for {prefix}")));
        }
        Ok(())
    }

    /// [`Datapath::release`] for many prefixes (those without a rule are skipped). Returns how
    /// many were removed.
    pub fn release_many(&mut self, prefixes: &[Prefix]) -> Result<usize> {
        let _lock = self.lock()?;
        let mut tries = None;
        let mut changes: Vec<Change> = Vec::new();
        for p in unique(prefixes) {
            if let Some(old) = self.stored_rule(p, &mut tries)? {
                changes.push((p, Some(old), None));
            }
        }
        self.change_rules(&changes)?;
        Ok(changes.len())
    }

    /// All rules, active and draining, sorted by prefix.
    pub fn list_rules(&mut self) -> Result<Vec<RuleInfo>> {
        let now = monotonic_ns();
        let mut out: Vec<RuleInfo> = self.rules()?.into_iter().map(|(p, v)| RuleInfo::new(p, &v, now)).collect();
        out.sort_by_key(|r| (r.prefix.addr, r.prefix.len));
        Ok(out)
    }

    /// Removes rules whose drain period has ended. Returns how many were removed.
    pub fn collect_drained(&mut self) -> Result<usize> {
        let now = monotonic_ns();
        // Cheap check first, without the lock: most calls find nothing to do.
        if !self.rules()?.iter().any(|(_, v)| decide::drain_state(v, now) == decide::Drain::Drained) {
            return Ok(0);
        }
        let _lock = self.lock()?;
        self.remove_drained_and_sync()
    }

    /// Under the instance lock: removes rules whose drain ended and brings the host tables in
    /// line with the rest. Returns how many were removed.
    pub(super) fn remove_drained_and_sync(&mut self) -> Result<usize> {
        let now = monotonic_ns();
        let (live, drained): (Vec<_>, Vec<_>) = self.rules()?.into_iter().partition(|(_, v)| decide::drain_state(v, now) != decide::Drain::Drained);
        for (p, _) in &drained {
            match self.remove_rule(*p) {
                Ok(()) | Err(Error::Invalid { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.sync_hosts(&live);
        Ok(drained.len())
    }
}

/// Migrations whose rules a call changes, with what was there before (for rollback).
type Previous = Vec<(Prefix, Option<RuleValue>)>;

/// A rule a call changes: its prefix, its rule before and after (`None`: none).
type Change = (Prefix, Option<RuleValue>, Option<RuleValue>);

/// `prefixes` without repeats, in their order.
fn unique(prefixes: &[Prefix]) -> impl Iterator<Item = Prefix> + '_ {
    let mut seen = std::collections::HashSet::new();
    prefixes.iter().copied().filter(move |p| seen.insert(*p))
}

/// The rule trie of the family whose addresses have `n` bytes (4: IPv4, 16: IPv6).
const fn trie_name(n: usize) -> &'static str {
    if n == 4 { maps::MIGRATED_V4 } else { maps::MIGRATED_V6 }
}

/// The map of single addresses' rules of the family whose addresses have `n` bytes.
const fn host_rules_name(n: usize) -> &'static str {
    if n == 4 { maps::HOST_RULES_V4 } else { maps::HOST_RULES_V6 }
}
