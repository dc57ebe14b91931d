//! Types shared by the kernel programs and user space.
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, without `bool` and with explicit
//! padding, so both sides agree on the bytes. Addresses are stored as 16 bytes: IPv6 as
//! is, IPv4 as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), in network order. Ports
//! are stored in network order too.
#![no_std]

pub mod decide;

/// Maximum number of steered services per instance.
pub const MAX_SERVICES: u32 = 1024;
/// Maximum number of client rules per address family, of each kind (single addresses, and
/// prefixes): a million migrated clients. Both kinds of map allocate per rule, not up front.
pub const MAX_RULES: u32 = 1 << 20;
/// `BPF_F_NO_PREALLOC`: a hash map that allocates its entries as they are added.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// Maximum number of configured siblings (tunnel sources accepted on decapsulation).
pub const MAX_SIBLINGS: u32 = 256;
/// Maximum number of adopted services with a registered listener.
pub const MAX_LISTENERS: u32 = 1024;
/// Maximum number of client addresses whose connections are counted (LRU beyond).
pub const MAX_CLIENTS: u32 = 131_072;
/// Maximum number of outstanding readiness probes.
pub const MAX_PROBES: u32 = 256;
/// Maximum number of TCP flows frozen at once (connections being moved live).
pub const MAX_FROZEN: u32 = 16_384;

/// Names of the pinned maps, as declared in the eBPF object.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    /// Prefix rules (shorter than one address).
    pub const MIGRATED_V4: &str = "MIGRATED_V4";
    pub const MIGRATED_V6: &str = "MIGRATED_V6";
    /// Rules of single client addresses (/32, /128).
    pub const HOST_RULES_V4: &str = "HOST_RULES_V4";
    pub const HOST_RULES_V6: &str = "HOST_RULES_V6";
    pub const SIBLINGS: &str = "SIBLINGS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const PROBES: &str = "PROBES";
    pub const ADOPTED: &str = "ADOPTED";
    pub const PORT_SLOTS_V4: &str = "PORT_SLOTS_V4";
    pub const PORT_SLOTS_V6: &str = "PORT_SLOTS_V6";
    pub const LOAD: &str = "LOAD";
    pub const LOAD_TOTAL: &str = "LOAD_TOTAL";
    pub const LOAD_CTL: &str = "LOAD_CTL";
    pub const LOAD_EVENTS: &str = "LOAD_EVENTS";
    pub const HOSTS_V4: &str = "HOSTS_V4";
    pub const HOSTS_V6: &str = "HOSTS_V6";
    pub const COUNTERS: &str = "COUNTERS";
    /// Counters added after `COUNTERS`' size was fixed (see [`crate::Counter::IN_COUNTERS`]).
    pub const COUNTERS_EXTRA: &str = "COUNTERS_EXTRA";
    pub const SYSCTLS: &str = "SYSCTLS";
    pub const FROZEN: &str = "FROZEN";
    pub const FROZEN_ANY: &str = "FROZEN_ANY";
    /// Maps of earlier versions, no longer used: their pins are removed on open.
    pub const OBSOLETE: [&str; 2] = ["PORTS", "NETS_V4"];
}

/// Names of the eBPF programs.
pub mod programs {
    /// TC ingress classifier on the uplink (origin steering and target decapsulation).
    pub const INGRESS: &str = "redirector_ingress";
    /// `sk_lookup` program delivering adopted services to a local listener.
    pub const SK_LOOKUP: &str = "redirector_sk_lookup";
    /// TC egress on a target's uplink: clamps the MSS of adopted services' SYN-ACKs.
    pub const EGRESS: &str = "redirector_egress";
    /// `sock_ops` on the application's cgroup: established connections per client.
    pub const SOCK_OPS: &str = "redirector_sock_ops";
    /// An empty classifier: the benchmark's baseline.
    pub const EMPTY: &str = "redirector_empty";
    /// XDP on the origin's uplink: forwards migrated clients' packets before the stack (the
    /// fast path), passing everything else to [`INGRESS`].
    pub const XDP: &str = "redirector_xdp";
    /// An empty XDP program: the XDP benchmark's baseline.
    pub const XDP_EMPTY: &str = "redirector_xdp_empty";
    /// The XDP benchmark's traffic source: redirects every packet to the interface in its
    /// global [`XDP_BENCH_TO`] (never attached by redirector).
    pub const XDP_BENCH_SOURCE: &str = "redirector_xdp_bench_source";
    /// The global of [`XDP_BENCH_SOURCE`]: the interface index it sends to.
    pub const XDP_BENCH_TO: &str = "XDP_BENCH_TO";
}

/// `BPF_F_MMAPABLE`: the slot tables are arrays that user space maps into its memory, so it
/// can order its stores (data before kind) the way the classifier reads them.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Entries of each `PORT_SLOTS_*` table: one per TCP port.
pub const PORT_SLOT_COUNT: u32 = 1 << 16;

/// Entries of each `HOSTS_*` table; a client address's low 16 bits pick its slot.
pub const HOST_SLOT_COUNT: u32 = 1 << 16;

/// Slot kind: nothing here (the packet passes after this one array read). Data is ignored.
pub const SLOT_EMPTY: u32 = 0;
/// Slot kind: exactly one entry maps here and its data is in the slot; the packet's address
/// must still equal the slot's.
pub const SLOT_ONE: u32 = 1;
/// Slot kind: several entries (or a prefix) map here: consult the authoritative maps
/// (`SERVICES`; for clients the exact rules, then the prefix trie). Data is ignored.
pub const SLOT_MANY: u32 = 2;
/// Slot kind (host tables only): several exact rules map here and no prefix covers the slot:
/// the exact rules alone decide, the trie is not consulted. Data is ignored.
pub const SLOT_EXACT: u32 = 3;

/// A direct-mapped cache entry in front of an authoritative map.
///
/// The authoritative maps (`SERVICES`, `HOST_RULES_*` and `MIGRATED_*`) hold every entry; a slot table only
/// lets the common packet decide after one array read. User space changes a slot so that
/// the classifier never trusts half-written data: data changes only while the kind says
/// "ignore data" (`SLOT_EMPTY`, `SLOT_MANY` or `SLOT_EXACT`), and the kind changes on its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot<D> {
    /// `SLOT_EMPTY`, `SLOT_ONE`, `SLOT_MANY` or `SLOT_EXACT`.
    pub kind: u32,
    pub _pad: u32,
    pub data: D,
}

/// A steered service in `PORT_SLOTS_V4` or `PORT_SLOTS_V6` (index: its port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortData {
    /// The service address.
    pub addr: Addr,
    pub service: ServiceValue,
}

/// A migrated client (a full-length prefix) in `HOSTS_*` (index: [`host_slot`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostData {
    /// The client address.
    pub addr: Addr,
    pub rule: RuleValue,
}

pub type PortSlot = Slot<PortData>;
pub type HostSlot = Slot<HostData>;

/// The `HOSTS_*` slot of a client address: its low 16 bits (the last two bytes, so the
/// slots a prefix of /16 or longer (IPv4) or /112 or longer (IPv6) covers are one range).
#[must_use]
pub const fn host_slot(a: &Addr) -> u32 {
    ((a[14] as u32) << 8) | a[15] as u32
}

/// A 16-byte address: IPv6, or IPv4-mapped IPv6 for IPv4.
pub type Addr = [u8; 16];

/// The socket mark (`SO_MARK`) of a socket whose connection was dumped to move: while its
/// flow is frozen, the egress program drops what it sends (its retransmission and loss-probe
/// timers still run in repair mode, and a segment of it stamped by its clock, later than the
/// new socket's, would make the peer drop the new socket's segments as old). Only packets of
/// frozen flows with this mark are dropped: another use of the same mark loses nothing else.
pub const MUTED_MARK: u32 = 0x7264_6d75;

/// A TCP flow of a steered service as it arrives at the origin: frozen (its packets
/// dropped) while its connection moves to another host, in `FROZEN` with the
/// `CLOCK_MONOTONIC` time the freeze ends by itself (should the agent never lift it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: Addr,
    pub service: Addr,
    pub client_port: [u8; 2],
    pub service_port: [u8; 2],
}

/// Maps an IPv4 address (network order bytes) to the 16-byte form.
#[must_use]
pub const fn v4_mapped(a: [u8; 4]) -> Addr {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

/// Returns the IPv4 address if `a` is IPv4-mapped.
#[must_use]
pub const fn as_v4(a: &Addr) -> Option<[u8; 4]> {
    if a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0 && a[4] == 0 && a[5] == 0 && a[6] == 0 && a[7] == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff {
        Some([a[12], a[13], a[14], a[15]])
    } else {
        None
    }
}

/// A steered or adopted service: address and TCP port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: Addr,
    /// TCP port, network order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

impl ServiceKey {
    #[must_use]
    pub const fn new(addr: Addr, port: u16) -> Self {
        Self { addr, port: port.to_be_bytes(), _pad: [0; 2] }
    }

    #[must_use]
    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// How the origin forwards a steered service's packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Outer source address of tunnelled packets: the origin's own (control) address of the
    /// service's family. Targets accept tunnels only from configured siblings.
    pub tunnel_src: Addr,
    /// Largest MSS a steered SYN may announce (uplink MTU minus inner and outer headers).
    pub mss_clamp: u16,
    /// [`SERVICE_LIVE_MOVES`] and [`SERVICE_XDP`], or 0.
    pub flags: u8,
    pub _pad: u8,
    /// Interface the programs are attached to, for information.
    pub ifindex: u32,
}

/// [`ServiceValue::flags`]: the service's own SYN-ACKs announce an MSS that fits the tunnel
/// (the origin's egress program lowers it to `mss_clamp`), so that any of its connections can
/// later move live to another host: the client's segments then reach it through the tunnel,
/// which has no room for a full-size one.
pub const SERVICE_LIVE_MOVES: u8 = 1;

/// [`ServiceValue::flags`]: the XDP program on the service's uplink (`redirector_xdp`) forwards
/// its migrated clients' packets itself where it can decide them as the classifier would;
/// without it, XDP passes the service's packets on to the classifier.
pub const SERVICE_XDP: u8 = 2;

/// Where a migrated client prefix goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleValue {
    /// Target server's (control) address: the outer destination.
    pub target: Addr,
    /// 0 while the rule is active. Otherwise the rule is draining until this
    /// `CLOCK_MONOTONIC` time (ns, as `bpf_ktime_get_ns`): new SYNs stay on the origin,
    /// packets of flows living on the target still go there; after it the rule is inert
    /// and user space removes it.
    pub drain_until_ns: u64,
    /// `CLOCK_REALTIME` seconds when the rule was installed, for listings.
    pub since_unix: u64,
}

/// A configured sibling, allowed to send tunnelled packets to this host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiblingValue {
    pub flags: u32,
}

/// A service of a sibling that this host (the target) serves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdoptedValue {
    /// Uplink the service's tunnelled packets arrive on.
    pub ifindex: u32,
    /// `ADOPTED_LISTENER` when a listener is registered in `LISTENERS`.
    pub flags: u32,
    /// Largest MSS this host's SYN-ACKs for the service may announce, so the client's
    /// segments still fit the origin's uplink once tunnelled (0: no clamp).
    pub mss_clamp: u16,
    pub _pad: [u8; 6],
}

/// `AdoptedValue::flags`: a listener is registered for the service.
pub const ADOPTED_LISTENER: u32 = 1;

/// The load watermark the `sock_ops` program watches (`LOAD_CTL[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadCtl {
    /// Report when the total of established connections exceeds this.
    pub high: u64,
    /// 1: report the next crossing (then 0 until user space arms it again).
    pub armed: u32,
    pub _pad: u32,
}

/// Sent on `LOAD_EVENTS` when the total passed the armed watermark.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadEvent {
    /// `CLOCK_MONOTONIC` ns (`bpf_ktime_get_ns`) of the connection that crossed it.
    pub at_ns: u64,
    /// The total right after that connection.
    pub total: u64,
}

/// A probe answer recorded by the classifier: key is the probe's source port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeValue {
    /// TCP flags of the answer (SYN|ACK: a listener answered; RST: nothing listens); 0 until
    /// an answer with the expected acknowledgement number came.
    pub tcp_flags: u8,
    pub _pad: [u8; 3],
    /// The acknowledgement number the target's answer carries (the probe's sequence number
    /// plus one), set by user space. Anyone can send a SYN-ACK or a reset from the service's
    /// address; only the target, which saw the probe, knows this number.
    pub ack: u32,
    pub seen_ns: u64,
}

/// Every decision the kernel programs make, counted per CPU.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not TCP/ICMP to a steered service, or not IP at all.
    Passed = 0,
    /// To a steered service, from a client with no rule.
    PassedNotMigrated,
    /// A SYN of a migrated client, sent to its target.
    ForwardedNew,
    /// A packet of a migrated client's flow that lives on the target, sent there.
    ForwardedExisting,
    /// A packet of a migrated client's flow that lives on this host, kept.
    KeptLocal,
    /// An ACK completing this host's own SYN-cookie handshake, kept.
    KeptSyncookie,
    /// A SYN of a client whose rule is draining, kept.
    KeptDraining,
    /// An ICMP/ICMPv6 error about a flow living on a target, relayed there.
    IcmpRelayed,
    /// IPv4 fragments and IPv6 fragment headers: never steered.
    PassedFragment,
    /// IPv4 options or IPv6 extension headers: never steered.
    PassedOptions,
    /// Truncated or malformed packets: passed untouched.
    PassedMalformed,
    /// Tunnelled packet from a configured sibling, decapsulated.
    Decapsulated,
    /// Tunnelled packet from a stranger (or malformed inside): dropped.
    DroppedBad,
    /// A readiness probe's answer, recorded and dropped.
    ProbeAnswer,
    /// Encapsulation or redirect failed: the packet was kept on this host.
    ErrorForward,
    /// A connection to an adopted service handed to the registered listener.
    SkAssigned,
    /// A SYN-ACK of an adopted service whose MSS was lowered for the tunnel.
    ClampedSynAck,
    /// A tunnelled packet from a sibling whose inner packet is not for a service adopted here.
    DroppedNotAdopted,
    /// An MSS option that needed lowering could not be changed (the packet went on as it was).
    ErrorClamp,
    /// A connection to an adopted service found no registered listener (refused).
    SkNoListener,
    /// A packet of a migrated client (rule active) that found only a `TIME_WAIT` socket here,
    /// sent to the target: the connection that ended here is over, and a new one on the same
    /// ports lives on the target.
    ForwardedTimeWait,
    /// A tunnelled packet from a sibling whose inner source is one of this node's addresses,
    /// a sibling's, or loopback: a forgery, dropped.
    DroppedSpoofed,
    /// A packet of a flow frozen while its connection moves to another host, dropped (the
    /// origin keeps a copy for the new host, `repair::Hold`).
    DroppedFrozen,
    /// A packet the origin's XDP fast path forwarded to its target itself (the classifier
    /// never saw it); also counted under its decision (`forwarded-new`, `forwarded-existing`,
    /// `forwarded-time-wait`).
    XdpForwarded,
    /// A packet the XDP fast path left to the classifier (anything it does not forward), which
    /// decides and counts it as without XDP.
    XdpPassed,
    /// A packet a dumped socket sent on its own (its timers run in repair mode), of a frozen
    /// flow, dropped on egress: the socket that carries the connection on is elsewhere, and
    /// the peer must not see the old one's clock (`MUTED_MARK`).
    DroppedMuted,
}

impl Counter {
    /// Number of counters.
    pub const COUNT: u32 = 26;

    /// Size of the pinned `COUNTERS` array: the counters before this index. It never grows: a
    /// pinned map of another size is refused (another layout), so a larger one would make an
    /// upgraded agent refuse every existing instance. Counters from this index on are entries
    /// of `COUNTERS_EXTRA`, at `index - IN_COUNTERS`.
    pub const IN_COUNTERS: u32 = 20;

    /// Size of the pinned `COUNTERS_EXTRA` array: room for counters added later, without
    /// another layout change.
    pub const EXTRA_SLOTS: u32 = 32;

    /// All counters, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Passed,
        Counter::PassedNotMigrated,
        Counter::ForwardedNew,
        Counter::ForwardedExisting,
        Counter::KeptLocal,
        Counter::KeptSyncookie,
        Counter::KeptDraining,
        Counter::IcmpRelayed,
        Counter::PassedFragment,
        Counter::PassedOptions,
        Counter::PassedMalformed,
        Counter::Decapsulated,
        Counter::DroppedBad,
        Counter::ProbeAnswer,
        Counter::ErrorForward,
        Counter::SkAssigned,
        Counter::ClampedSynAck,
        Counter::DroppedNotAdopted,
        Counter::ErrorClamp,
        Counter::SkNoListener,
        Counter::ForwardedTimeWait,
        Counter::DroppedSpoofed,
        Counter::DroppedFrozen,
        Counter::XdpForwarded,
        Counter::XdpPassed,
        Counter::DroppedMuted,
    ];

    /// The counter's entry in `COUNTERS_EXTRA`, or `None` for an entry of `COUNTERS` (at its
    /// own index).
    #[must_use]
    pub const fn extra_index(self) -> Option<u32> {
        let i = self as u32;
        if i < Self::IN_COUNTERS { None } else { Some(i - Self::IN_COUNTERS) }
    }

    /// Stable, kebab-case name used by the CLI and JSON output.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Passed => "passed",
            Counter::PassedNotMigrated => "passed-not-migrated",
            Counter::ForwardedNew => "forwarded-new",
            Counter::ForwardedExisting => "forwarded-existing",
            Counter::KeptLocal => "kept-local",
            Counter::KeptSyncookie => "kept-syncookie",
            Counter::KeptDraining => "kept-draining",
            Counter::IcmpRelayed => "icmp-relayed",
            Counter::PassedFragment => "passed-fragment",
            Counter::PassedOptions => "passed-options",
            Counter::PassedMalformed => "passed-malformed",
            Counter::Decapsulated => "decapsulated",
            Counter::DroppedBad => "dropped-bad",
            Counter::ProbeAnswer => "probe-answer",
            Counter::ErrorForward => "error-forward",
            Counter::SkAssigned => "sk-assigned",
            Counter::ClampedSynAck => "clamped-syn-ack",
            Counter::DroppedNotAdopted => "dropped-not-adopted",
            Counter::ErrorClamp => "error-clamp",
            Counter::SkNoListener => "sk-no-listener",
            Counter::ForwardedTimeWait => "forwarded-time-wait",
            Counter::DroppedSpoofed => "dropped-spoofed",
            Counter::DroppedFrozen => "dropped-frozen",
            Counter::XdpForwarded => "xdp-forwarded",
            Counter::XdpPassed => "xdp-passed",
            Counter::DroppedMuted => "dropped-muted",
        }
    }
}

const _: () = assert!(Counter::COUNT <= Counter::IN_COUNTERS + Counter::EXTRA_SLOTS, "COUNTERS_EXTRA is full");

#[cfg(test)]
mod tests {
    use super::Counter;

    #[test]
    fn counters_are_listed_in_index_order_with_distinct_names() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
            assert!(Counter::ALL[..i].iter().all(|o| o.name() != c.name()), "{} twice", c.name());
        }
    }

    #[test]
    fn the_first_counters_keep_their_pinned_array() {
        // COUNTERS' size is part of the pinned layout: 20 entries since the layout check exists.
        assert_eq!(Counter::IN_COUNTERS, 20);
        assert_eq!(Counter::SkNoListener.extra_index(), None);
        assert_eq!(Counter::ForwardedTimeWait.extra_index(), Some(0));
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, with explicit padding and no invalid bit
    // patterns.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::SiblingValue {}
    unsafe impl aya::Pod for super::ProbeValue {}
    unsafe impl aya::Pod for super::AdoptedValue {}
    unsafe impl aya::Pod for super::PortSlot {}
    unsafe impl aya::Pod for super::LoadCtl {}
    unsafe impl aya::Pod for super::LoadEvent {}
    unsafe impl aya::Pod for super::HostSlot {}
    unsafe impl aya::Pod for super::FlowKey {}
}
