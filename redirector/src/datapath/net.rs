//! Interface facts, routes and sysctls the datapath needs (through iproute2 and /proc/sys).

use std::{
    fs,
    net::IpAddr,
    process::Command,
};

use nix::ifaddrs::getifaddrs;

use super::{Error, Result};

/// Index of interface `name` in the current network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    if name.is_empty() || name.len() > 15 || name.contains('/') {
        return Err(Error::NoInterface { name: name.into() });
    }
    nix::net::if_::if_nametoindex(name).map_err(|_| Error::NoInterface { name: name.into() })
}

/// Name of interface `ifindex` in the current network namespace.
pub fn ifname(ifindex: u32) -> Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(Error::NoInterface { name: format!("#{ifindex}") });
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// MTU of interface `name`.
pub fn mtu(name: &str) -> Result<u32> {
    ifindex(name)?;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| Error::io("opening a socket for SIOCGIFMTU", e))?;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    // SAFETY: req is a valid ifreq with a NUL-terminated name.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&sock), libc::SIOCGIFMTU, &mut req) };
    if rc < 0 {
        return Err(Error::io(format!("reading the MTU of {name}"), std::io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFMTU filled the mtu member.
    Ok(u32::try_from(unsafe { req.ifr_ifru.ifru_mtu }).unwrap_or(1500))
}

fn addresses_of(name: Option<&str>) -> Result<Vec<IpAddr>> {
    let addrs = getifaddrs().map_err(|e| Error::io("listing interface addresses", e.into()))?;
    let mut out = Vec::new();
    for ifa in addrs {
        if name.is_some_and(|n| n != ifa.interface_name) {
            continue;
        }
        let Some(a) = ifa.address else { continue };
        if let Some(v4) = a.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = a.as_sockaddr_in6() {
            out.push(IpAddr::V6(v6.ip()));
        }
    }
    Ok(out)
}

/// The first address of `ifname` of `service`'s family that is not `service` itself nor
/// link-local: the host's own control address, used as the tunnel source.
pub fn control_address(ifname: &str, service: IpAddr) -> Result<IpAddr> {
    addresses_of(Some(ifname))?
        .into_iter()
        .find(|a| {
            a.is_ipv4() == service.is_ipv4()
                && *a != service
                && !matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
        })
        .ok_or_else(|| {
            Error::invalid(format!(
                "{ifname} has no {} address other than the service address {service}: give --tunnel-src",
                if service.is_ipv4() { "IPv4" } else { "IPv6" }
            ))
        })
}

/// Whether `addr` is configured on any interface of this namespace.
pub fn is_interface_address(addr: IpAddr) -> Result<bool> {
    Ok(addresses_of(None)?.contains(&addr))
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::io("running ip (iproute2)", e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::invalid(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn host_route(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(_) => format!("{addr}/32"),
        IpAddr::V6(_) => format!("{addr}/128"),
    }
}

fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "-4" } else { "-6" }
}

fn sysctl(path: &str, value: &str) -> Result<()> {
    let full = format!("/proc/sys/{path}");
    if fs::read_to_string(&full).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    fs::write(&full, value).map_err(|e| Error::io(format!("setting {path}={value}"), e))
}

/// Prepares this host to serve a sibling's `addr` arriving on `ifname` (idempotent):
/// a `local` route in the local table (delivery and DSR source), no ARP answers for it, and
/// loose reverse-path filtering.
pub fn prepare_target(ifname: &str, addr: IpAddr) -> Result<()> {
    if addr.is_ipv4() {
        for (k, v) in [
            (format!("net/ipv4/conf/{ifname}/arp_ignore"), "1"),
            (format!("net/ipv4/conf/{ifname}/arp_announce"), "2"),
            (format!("net/ipv4/conf/{ifname}/accept_local"), "1"),
            (format!("net/ipv4/conf/{ifname}/rp_filter"), "2"),
            ("net/ipv4/conf/all/arp_ignore".to_string(), "1"),
            ("net/ipv4/conf/all/arp_announce".to_string(), "2"),
        ] {
            sysctl(&k, v)?;
        }
        // The effective rp_filter is the maximum of `all` and the interface's: strict (1) would
        // not matter for the inner packet, but keep `all` from forcing it.
        if fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").is_ok_and(|v| v.trim() == "1") {
            sysctl("net/ipv4/conf/all/rp_filter", "2")?;
        }
    }
    ip(&[family(addr), "route", "replace", "local", &host_route(addr), "dev", "lo", "table", "local"])?;
    Ok(())
}

/// Removes the `local` route of an adopted address (missing is fine).
pub fn remove_local_route(addr: IpAddr) -> Result<()> {
    match ip(&[family(addr), "route", "del", "local", &host_route(addr), "dev", "lo", "table", "local"]) {
        Ok(_) => Ok(()),
        Err(Error::Invalid { what }) if what.contains("No such process") || what.contains("not found") => Ok(()),
        Err(e) => Err(e),
    }
}
