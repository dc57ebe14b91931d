//! Typed views of the steering state for the API, the CLI and JSON.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use redirector_common::{
    Addr, RuleValue, as_v4,
    decide::{Drain, drain_state},
    v4_mapped,
};
use serde::Serialize;

pub(crate) fn to16(a: IpAddr) -> Addr {
    match a {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub(crate) fn from16(a: &Addr) -> IpAddr {
    match as_v4(a) {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(*a)),
    }
}

/// "IPv4" or "IPv6", for messages.
#[must_use]
pub fn family_name(v4: bool) -> &'static str {
    if v4 { "IPv4" } else { "IPv6" }
}

pub(crate) fn sock(a: IpAddr, port: u16) -> String {
    match a {
        IpAddr::V4(_) => format!("{a}:{port}"),
        IpAddr::V6(_) => format!("[{a}]:{port}"),
    }
}

/// A client prefix: an address with a prefix length; host bits must be zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Whether it is one address (/32, /128): its rule lives in a hash map, not in a trie.
    #[must_use]
    pub fn is_host(&self) -> bool {
        self.len == if self.addr.is_ipv4() { 32 } else { 128 }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("bad prefix {s:?}: {a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| format!("bad prefix {s:?}: length must be 0..={max}"))?,
        };
        let bits = match addr {
            IpAddr::V4(v) => u128::from(u32::from(v)) << 96,
            IpAddr::V6(v) => u128::from(v),
        };
        // v4 sits in the top 32 bits, so the prefix is always the top `len` bits.
        let host_mask = if len >= 128 { 0 } else { u128::MAX >> len };
        if bits & host_mask != 0 {
            return Err(format!("bad prefix {s:?}: host bits are set past /{len}"));
        }
        Ok(Prefix { addr, len })
    }
}

/// A steered service on the origin.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceInfo {
    #[serde(skip)]
    pub addr: IpAddr,
    #[serde(skip)]
    pub port: u16,
    pub tunnel_src: IpAddr,
    pub mss_clamp: u16,
    pub ifindex: u32,
    /// The XDP fast path forwards the service's migrated clients' packets
    /// ([`redirector_common::SERVICE_XDP`]).
    pub xdp: bool,
    /// Why the XDP fast path was asked for and is not on (the classifier alone steers).
    #[serde(skip)]
    pub xdp_unavailable: Option<String>,
}

impl ServiceInfo {
    /// `addr:port` (IPv6 in brackets).
    #[must_use]
    pub fn service(&self) -> String {
        sock(self.addr, self.port)
    }
}

/// Life cycle of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleState {
    Active,
    Draining,
    /// The drain period ended: inert in the kernel, removed on the next open.
    Drained,
}

/// A rule as listed.
#[derive(Clone, Debug, Serialize)]
pub struct RuleInfo {
    #[serde(serialize_with = "ser_display")]
    pub prefix: Prefix,
    pub target: IpAddr,
    pub state: RuleState,
    /// Time left in the drain period, in ms (0 unless draining).
    pub drain_left_ms: u64,
    pub since_unix: u64,
}

fn ser_display<S: serde::Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl RuleInfo {
    pub(crate) fn new(prefix: Prefix, v: &RuleValue, now_ns: u64) -> Self {
        let (state, left) = match drain_state(v, now_ns) {
            Drain::Active => (RuleState::Active, 0),
            Drain::Draining { left_ns } => (RuleState::Draining, left_ns / 1_000_000),
            Drain::Drained => (RuleState::Drained, 0),
        };
        Self { prefix, target: from16(&v.target), state, drain_left_ms: left, since_unix: v.since_unix }
    }
}

/// The application's established connections, from the kernel.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Load {
    /// All established connections.
    pub total: u64,
    /// (client address, connections), largest first.
    pub clients: Vec<(IpAddr, u64)>,
}

/// Per-decision counters, summed over CPUs, in `Counter` order.
#[derive(Clone, Debug)]
pub struct Stats {
    pub counters: Vec<(&'static str, u64)>,
}

impl Stats {
    /// The value of counter `name` (0 if unknown).
    #[must_use]
    pub fn get(&self, name: &str) -> u64 {
        self.counters.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_reject_bad_input() {
        assert_eq!("198.18.1.5".parse::<Prefix>().unwrap().len, 32);
        assert_eq!("198.18.1.0/24".parse::<Prefix>().unwrap().len, 24);
        assert_eq!("2001:db8::1:5".parse::<Prefix>().unwrap().len, 128);
        assert_eq!("2001:db8:1::/48".parse::<Prefix>().unwrap().len, 48);
        assert_eq!("0.0.0.0/0".parse::<Prefix>().unwrap().len, 0);
        assert!("198.18.1.5/24".parse::<Prefix>().is_err(), "host bits set");
        assert!("198.18.1.0/33".parse::<Prefix>().is_err());
        assert!("2001:db8::/129".parse::<Prefix>().is_err());
        assert!("nonsense".parse::<Prefix>().is_err());
        assert!("198.18.1.0/x".parse::<Prefix>().is_err());
        assert!("2001:db8::1/64".parse::<Prefix>().is_err());
    }

    #[test]
    fn addresses_round_trip() {
        for a in ["198.18.0.1", "2001:db8::1", "::ffff:0:1"] {
            let ip: IpAddr = a.parse().unwrap();
            let back = from16(&to16(ip));
            // ::ffff:0:1 is IPv4-mapped and comes back as IPv4: the maps cannot tell them apart.
            if a.starts_with("::ffff") {
                assert_eq!(back, IpAddr::from([0, 0, 0, 1]));
            } else {
                assert_eq!(back, ip);
            }
        }
    }
}
