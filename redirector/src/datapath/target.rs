//! The target's side: the siblings whose tunnels are accepted, and the services adopted from
//! them (routes, interface settings, listeners).

use std::{net::IpAddr, os::fd::AsRawFd as _};

use aya::maps::{HashMap, MapData, MapError, SockHash};
use redirector_common::{ADOPTED_LISTENER, AdoptedValue, ServiceKey, SiblingValue, decide, maps};

use super::{Datapath, Error, Listener, Result, listener, net, netlink, types};

impl Datapath {
    fn siblings(&mut self) -> Result<HashMap<&mut MapData, [u8; 16], SiblingValue>> {
        self.open_map(maps::SIBLINGS)
    }

    fn adopted(&mut self) -> Result<HashMap<&mut MapData, ServiceKey, AdoptedValue>> {
        self.open_map(maps::ADOPTED)
    }

    fn listeners(&mut self) -> Result<SockHash<&mut MapData, ServiceKey>> {
        self.open_map(maps::LISTENERS)
    }

    /// The key and value of adopted `service`, or an error saying it is not adopted.
    fn adopted_value(&mut self, service: (IpAddr, u16)) -> Result<(ServiceKey, AdoptedValue)> {
        let key = ServiceKey::new(types::to16(service.0), service.1);
        let value = self.adopted()?.get(&key, 0).map_err(|e| match e {
            MapError::KeyNotFound => Error::invalid(format!("service {} is not adopted", types::sock(service.0, service.1))),
            e => Error::bpf("reading ADOPTED", e),
        })?;
        Ok((key, value))
    }

    fn sysctls(&mut self) -> Result<HashMap<&mut MapData, u32, u32>> {
        self.open_map(maps::SYSCTLS)
    }

    /// Accepts tunnelled packets whose outer source is `sibling`; attaches the classifier to
    /// `ifname`.
    pub fn add_sibling(&mut self, sibling: IpAddr, ifname: &str) -> Result<()> {
        if sibling.is_unspecified() || sibling.is_multicast() {
            return Err(Error::invalid(format!("sibling {sibling} is not a unicast address")));
        }
        net::ifindex(ifname)?;
        let _lock = self.lock()?;
        self.attach_ingress(ifname, false)?;
        self.siblings()?.insert(types::to16(sibling), SiblingValue { flags: 0 }, 0).map_err(|e| Error::bpf(format!("adding sibling {sibling}"), e))
    }

    /// Stops accepting tunnels from `sibling`.
    pub fn del_sibling(&mut self, sibling: IpAddr) -> Result<()> {
        let _lock = self.lock()?;
        self.siblings()?.remove(&types::to16(sibling)).map_err(|e| match e {
            MapError::KeyNotFound => Error::invalid(format!("{sibling} is not a sibling")),
            e => Error::bpf("removing sibling", e),
        })
    }

    /// Configured siblings.
    pub fn list_siblings(&mut self) -> Result<Vec<IpAddr>> {
        let map = self.siblings()?;
        let mut out: Vec<IpAddr> = map.keys().filter_map(Result::ok).map(|k| types::from16(&k)).collect();
        out.sort();
        Ok(out)
    }

    /// Serves a sibling's service address here: a `local` route for it (no address on any
    /// interface, so no ARP/ND answers), the interface settings delivery and DSR need (the
    /// originals are kept and put back when the last adopted service of the interface goes),
    /// and, with `listener`, the `sk_lookup` entry that hands its connections to the listening
    /// socket bound to that local address. On failure, nothing of it stays.
    pub fn adopt(&mut self, service: (IpAddr, u16), ifname: &str, listener: Option<Listener>, mtu: Option<u32>) -> Result<()> {
        let (addr, port) = service;
        if port == 0 || addr.is_unspecified() || addr.is_multicast() {
            return Err(Error::invalid(format!("{} is not a service address", types::sock(addr, port))));
        }
        let ifindex = net::ifindex(ifname)?;
        let mtu = match mtu {
            Some(m) => m,
            None => net::mtu(ifname)?,
        };
        if net::is_interface_address(addr)? {
            return Err(Error::invalid(format!("{addr} is an address of this host: a service is adopted from a sibling, not from itself")));
        }
        let listener_fd = match listener {
            Some(l) => Some(listener::find(l)?),
            None => None,
        };
        let _lock = self.lock()?;
        self.attach_ingress(ifname, false)?;
        self.attach_egress(ifname, false)?;
        self.attach_sk_lookup(false)?;
        let key = ServiceKey::new(types::to16(addr), port);
        let had_route = self.list_adopted()?.iter().any(|(a, _, _)| *a == addr);
        let result = (|| -> Result<()> {
            self.save_and_set_sysctls(ifname, ifindex, addr)?;
            netlink::add_local_route(addr)?;
            if let Some(fd) = &listener_fd {
                self.listeners()?.insert(key, fd.as_raw_fd(), 0).map_err(|e| Error::bpf("registering the listener", e))?;
            }
            let flags = if listener_fd.is_some() { ADOPTED_LISTENER } else { 0 };
            let value = AdoptedValue { ifindex, flags, mss_clamp: decide::mss_clamp(mtu, addr.is_ipv6()), _pad: [0; 6] };
            self.adopted()?.insert(key, value, 0).map_err(|e| Error::bpf("recording the adopted service", e))
        })();
        if let Err(e) = result {
            if !had_route {
                let _ = netlink::remove_local_route(addr);
            }
            let _ = self.restore_sysctls_if_unused(ifindex);
            return Err(e);
        }
        Ok(())
    }

    /// (Re)registers `listener`, the listening socket bound to that local address, for the
    /// adopted `service`: an application that restarted has a new socket, and its old one left
    /// the `sk_lookup` map when it closed. Idempotent.
    pub fn register_listener(&mut self, service: (IpAddr, u16), listener: Listener) -> Result<()> {
        let fd = listener::find(listener)?;
        let _lock = self.lock()?;
        let (key, mut value) = self.adopted_value(service)?;
        self.listeners()?.insert(key, fd.as_raw_fd(), 0).map_err(|e| Error::bpf("registering the listener", e))?;
        if value.flags & ADOPTED_LISTENER == 0 {
            value.flags |= ADOPTED_LISTENER;
            self.adopted()?.insert(key, value, 0).map_err(|e| Error::bpf("recording the listener", e))?;
        }
        Ok(())
    }

    /// Gives an adopted service back: removes its listener entry, its route once no other
    /// port of that address is adopted, and puts back the interface's settings once no adopted
    /// service uses it.
    pub fn unadopt(&mut self, service: (IpAddr, u16)) -> Result<()> {
        let _lock = self.lock()?;
        self.unadopt_locked(service)
    }

    pub(super) fn unadopt_locked(&mut self, service: (IpAddr, u16)) -> Result<()> {
        let addr = service.0;
        let (key, old) = self.adopted_value(service)?;
        self.adopted()?.remove(&key).map_err(|e| Error::bpf("removing adopted service", e))?;
        let _ = self.listeners()?.remove(&key);
        if !self.list_adopted()?.iter().any(|(a, _, _)| *a == addr) {
            netlink::remove_local_route(addr)?;
        }
        self.restore_sysctls_if_unused(old.ifindex)
    }

    /// Adopted services: (address, port, has listener).
    pub fn list_adopted(&mut self) -> Result<Vec<(IpAddr, u16, bool)>> {
        Ok(self.adopted_values()?.into_iter().map(|(a, p, v)| (a, p, v.flags & ADOPTED_LISTENER != 0)).collect())
    }

    fn adopted_values(&mut self) -> Result<Vec<(IpAddr, u16, AdoptedValue)>> {
        let map = self.adopted()?;
        let mut out = Vec::new();
        for item in &map {
            let (k, v) = item.map_err(|e| Error::bpf("reading ADOPTED", e))?;
            out.push((types::from16(&k.addr), k.port(), v));
        }
        out.sort_by_key(|(a, p, _)| (*a, *p));
        Ok(out)
    }

    /// Sets what a target needs on `ifname` (IPv4: no ARP answers for adopted addresses,
    /// tunnelled packets with local source addresses accepted, loose reverse-path filter),
    /// keeping each original value in `SYSCTLS` the first time.
    fn save_and_set_sysctls(&mut self, ifname: &str, ifindex: u32, addr: IpAddr) -> Result<()> {
        if !addr.is_ipv4() {
            return Ok(());
        }
        for (i, (name, value)) in net::TARGET_SYSCTLS.iter().enumerate() {
            let key = (ifindex << 8) | u32::try_from(i).unwrap_or(0);
            let current = net::read_sysctl_v4(ifname, name)?;
            if current == *value {
                continue;
            }
            let mut saved = self.sysctls()?;
            if saved.get(&key, 0).is_err() {
                saved.insert(key, current, 0).map_err(|e| Error::bpf("saving a sysctl", e))?;
            }
            net::write_sysctl_v4(ifname, name, *value)?;
        }
        Ok(())
    }

    /// Puts back the saved settings of interface `ifindex` if no adopted service uses it.
    fn restore_sysctls_if_unused(&mut self, ifindex: u32) -> Result<()> {
        if self.adopted_values()?.iter().any(|(_, _, v)| v.ifindex == ifindex) {
            return Ok(());
        }
        let saved: Vec<(u32, u32)> = self.sysctls()?.iter().filter_map(Result::ok).filter(|(k, _)| k >> 8 == ifindex).collect();
        if saved.is_empty() {
            return Ok(());
        }
        let ifname = net::ifname(ifindex)?;
        for (key, value) in saved {
            if let Some((name, _)) = net::TARGET_SYSCTLS.get((key & 0xff) as usize) {
                net::write_sysctl_v4(&ifname, name, value)?;
            }
            let _ = self.sysctls()?.remove(&key);
        }
        Ok(())
    }
}
