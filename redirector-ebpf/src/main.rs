//! redirector's kernel programs.
//!
//! - `redirector_ingress` (TC ingress on the uplink): on the origin, steers new TCP connections
//!   of migrated clients to their target through IP-in-IP / IPv6-in-IPv6, keeps flows that live
//!   here, relays ICMP errors of flows that live on a target and records readiness-probe answers;
//!   on the target, decapsulates tunnelled packets from configured siblings and drops the rest.
//! - `redirector_sk_lookup` (netns `sk_lookup`): hands connections to an adopted service address
//!   to the listener registered for it.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod hdr;

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem, ptr,
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_CURRENT_NETNS, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_sock, bpf_sock_tuple, sk_action,
    },
    helpers::generated::{bpf_ktime_get_ns, bpf_redirect_neigh, bpf_sk_release, bpf_skb_change_head, bpf_skb_load_bytes, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie},
    macros::{classifier, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, SockOpsContext, TcContext},
};
use hdr::{EthHdr, IcmpHdr, Ipv4Hdr, Ipv6Hdr, TcpHdr};
use redirector_common::{
    Addr, AdoptedValue, BPF_F_MMAPABLE, Counter, HOST_SLOT_COUNT, HostSlot, LoadCtl, LoadEvent, MAX_CLIENTS, MAX_LISTENERS, MAX_PROBES, MAX_RULES, MAX_SERVICES, MAX_SIBLINGS,
    PORT_SLOT_COUNT, PortSlot, ProbeValue, RuleValue, SLOT_MANY, SLOT_ONE, ServiceKey, ServiceValue, SiblingValue, as_v4,
    decide::{self, Found, Place, Step, TCP_ACK, TCP_ESTABLISHED, TCP_RST, TCP_SYN, icmp4_is_error, icmp6_is_error, is_answer, migrated_step},
    host_slot, v4_mapped,
};

#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);
#[map]
static MIGRATED_V4: LpmTrie<[u8; 4], RuleValue> = LpmTrie::pinned(MAX_RULES, 0);
#[map]
static MIGRATED_V6: LpmTrie<[u8; 16], RuleValue> = LpmTrie::pinned(MAX_RULES, 0);
#[map]
static SIBLINGS: HashMap<Addr, SiblingValue> = HashMap::pinned(MAX_SIBLINGS, 0);
#[map]
static LISTENERS: SockHash<ServiceKey> = SockHash::pinned(MAX_LISTENERS, 0);
#[map]
static PROBES: HashMap<u32, ProbeValue> = HashMap::pinned(MAX_PROBES, 0);
#[map]
static ADOPTED: HashMap<ServiceKey, AdoptedValue> = HashMap::pinned(MAX_LISTENERS, 0);
/// The steered IPv4 service of each TCP port (one array read decides most packets).
#[map]
static PORT_SLOTS_V4: Array<PortSlot> = Array::pinned(PORT_SLOT_COUNT, BPF_F_MMAPABLE);
/// The steered IPv6 service of each TCP port.
#[map]
static PORT_SLOTS_V6: Array<PortSlot> = Array::pinned(PORT_SLOT_COUNT, BPF_F_MMAPABLE);
/// Migrated IPv4 clients by the low 16 bits of their address, in front of `MIGRATED_V4`.
#[map]
static HOSTS_V4: Array<HostSlot> = Array::pinned(HOST_SLOT_COUNT, BPF_F_MMAPABLE);
/// Migrated IPv6 clients by the low 16 bits of their address, in front of `MIGRATED_V6`.
#[map]
static HOSTS_V6: Array<HostSlot> = Array::pinned(HOST_SLOT_COUNT, BPF_F_MMAPABLE);
/// Established connections per client address, for choosing whom to move. Least recently
/// changed entries make room for new clients when the map is full, so a count can be low;
/// `LOAD_TOTAL` is always exact.
#[map]
static LOAD: LruHashMap<Addr, i64> = LruHashMap::pinned(MAX_CLIENTS, 0);
/// `[0]`: established connections of the application(s), in total.
#[map]
static LOAD_TOTAL: Array<i64> = Array::pinned(1, 0);
/// `[0]`: the watermark whose crossing is reported on `LOAD_EVENTS`.
#[map]
static LOAD_CTL: Array<LoadCtl> = Array::pinned(1, 0);
/// One [`LoadEvent`] when the total passes the armed watermark.
#[map]
static LOAD_EVENTS: RingBuf = RingBuf::pinned(4096, 0);
/// Not used by the programs: user space keeps here the original interface settings it changed
/// on a target, to put them back (key: ifindex << 8 | setting).
#[map]
static SYSCTLS: HashMap<u32, u32> = HashMap::pinned(1024, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::IN_COUNTERS, 0);
/// Counters added after `COUNTERS`' size was fixed (`Counter::extra_index`).
#[map]
static COUNTERS_EXTRA: PerCpuArray<u64> = PerCpuArray::pinned(Counter::EXTRA_SLOTS, 0);

const ETH_LEN: usize = mem::size_of::<EthHdr>();
const IP4_LEN: usize = mem::size_of::<Ipv4Hdr>();
const IP6_LEN: usize = mem::size_of::<Ipv6Hdr>();
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
const TC_ACT_REDIRECT: i32 = 7;
/// Offset of the TCP checksum in its header.
const TCP_CSUM_OFF: usize = 16;
const TCP_LEN: usize = mem::size_of::<TcpHdr>();

/// What the classifier does with a packet, and which counter says so.
#[derive(Clone, Copy)]
struct Verdict {
    action: i32,
    counter: Counter,
}

/// Leaves the packet to the next program in the TCX chain (then the stack): redirector only
/// ends the chain for packets it owns (forwarded or dropped).
const TCX_NEXT: i32 = -1;

const fn pass(counter: Counter) -> Verdict {
    Verdict { action: TCX_NEXT, counter }
}

const fn drop(counter: Counter) -> Verdict {
    Verdict { action: TC_ACT_SHOT, counter }
}

/// Why a packet could not be handled normally; each maps to a verdict.
#[derive(Clone, Copy)]
enum Error {
    /// Shorter than its headers claim: pass untouched.
    Truncated,
    /// Tunnelled packet that must not be delivered.
    BadTunnel,
    /// Tunnelled packet from a sibling for something not adopted here.
    NotAdopted,
    /// Encapsulation failed before the packet was changed: keep it here.
    ForwardKept,
    /// Encapsulation or redirect failed after the packet was changed: drop.
    ForwardLost,
}

impl Error {
    const fn verdict(self) -> Verdict {
        match self {
            Error::Truncated => pass(Counter::PassedMalformed),
            Error::BadTunnel => drop(Counter::DroppedBad),
            Error::NotAdopted => drop(Counter::DroppedNotAdopted),
            Error::ForwardKept => pass(Counter::ErrorForward),
            Error::ForwardLost => drop(Counter::ErrorForward),
        }
    }
}

#[classifier]
pub fn redirector_ingress(ctx: TcContext) -> i32 {
    let verdict = match try_ingress(&ctx) {
        Ok(v) => v,
        Err(e) => e.verdict(),
    };
    count(verdict.counter);
    verdict.action
}

/// Counts a verdict's counter in `COUNTERS`. A counter of `COUNTERS_EXTRA` has no entry there
/// (an array lookup past the end finds nothing): it is counted where it is decided, with
/// [`count_extra`], so that counting the common packet stays one array lookup.
#[inline(always)]
fn count(counter: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Counts `counter` if it is one of `COUNTERS_EXTRA` (a constant at every call site, so the
/// test folds away).
#[inline(always)]
fn count_extra(counter: Counter) {
    if let Some(i) = counter.extra_index()
        && let Some(c) = COUNTERS_EXTRA.get_ptr_mut(i)
    {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// A slot's kind, read first. User space writes a slot's data first and its kind last; the
/// data is read only in the branch the kind selects, through raw pointers (which the compiler
/// cannot load from speculatively), so data read after a kind that says "use me" is complete.
#[inline(always)]
fn kind_of(kind: *const u32) -> u32 {
    // SAFETY: callers pass pointers into map values they hold.
    unsafe { ptr::read_volatile(kind) }
}

#[inline(always)]
fn read<T: Copy>(p: *const T) -> T {
    // SAFETY: callers pass pointers into map values they hold.
    unsafe { ptr::read(p) }
}

/// An address as four native-order words, the way the slot tables are compared.
#[inline(always)]
fn words(a: &Addr) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Whether the address stored in a slot is `w`.
#[inline(always)]
fn addr_is(stored: *const Addr, w: &[u32; 4]) -> bool {
    // Slot data starts 8 bytes into an 8-byte aligned map value.
    let p = stored.cast::<u32>();
    read(p) == w[0] && read(p.wrapping_add(1)) == w[1] && read(p.wrapping_add(2)) == w[2] && read(p.wrapping_add(3)) == w[3]
}

/// The steered IPv6 service at `dst` and TCP `port`: from the port's slot, or from `SERVICES`
/// when several addresses share the port.
#[inline(always)]
fn service_at_v6(dst: &Addr, port: [u8; 2]) -> Option<ServiceValue> {
    let slot = PORT_SLOTS_V6.get_ptr(u32::from(u16::from_be_bytes(port)))?;
    // SAFETY: a valid map value; fields are read in place, in order.
    match kind_of(unsafe { &raw const (*slot).kind }) {
        SLOT_ONE => unsafe { addr_is(&raw const (*slot).data.addr, &words(dst)).then(|| read(&raw const (*slot).data.service)) },
        // SAFETY: map values are plain data.
        SLOT_MANY => unsafe { SERVICES.get(ServiceKey { addr: *dst, port, _pad: [0; 2] }) }.copied(),
        _ => None,
    }
}

/// The steered IPv4 service at `dst` (its four bytes as a native-order word) and TCP `port`.
#[inline(always)]
fn service_at_v4(dst: u32, dst4: [u8; 4], port: [u8; 2]) -> Option<ServiceValue> {
    let slot = PORT_SLOTS_V4.get_ptr(u32::from(u16::from_be_bytes(port)))?;
    // SAFETY: a valid map value; fields are read in place, in order.
    match kind_of(unsafe { &raw const (*slot).kind }) {
        // PORT_SLOTS_V4 holds IPv4-mapped addresses only: the last word decides.
        SLOT_ONE => unsafe { (read((&raw const (*slot).data.addr).cast::<u32>().wrapping_add(3)) == dst).then(|| read(&raw const (*slot).data.service)) },
        // SAFETY: map values are plain data.
        SLOT_MANY => unsafe { SERVICES.get(ServiceKey { addr: v4_mapped(dst4), port, _pad: [0; 2] }) }.copied(),
        _ => None,
    }
}

/// The rule of IPv4 client `src`, if it is migrated: from its slot, or from the trie when the
/// slot is shared.
#[inline(always)]
fn host_rule_v4(src: [u8; 4]) -> Option<RuleValue> {
    let slot = HOSTS_V4.get_ptr((u32::from(src[2]) << 8) | u32::from(src[3]))?;
    // SAFETY: a valid map value; fields are read in place, in order.
    match kind_of(unsafe { &raw const (*slot).kind }) {
        // HOSTS_V4 holds IPv4-mapped addresses only: the last word decides.
        SLOT_ONE => unsafe { (read((&raw const (*slot).data.addr).cast::<u32>().wrapping_add(3)) == u32::from_ne_bytes(src)).then(|| read(&raw const (*slot).data.rule)) },
        SLOT_MANY => MIGRATED_V4.get(Key::new(32, src)).copied(),
        _ => None,
    }
}

/// The rule of IPv6 client `src`, if it is migrated.
#[inline(always)]
fn host_rule_v6(src: &Addr) -> Option<RuleValue> {
    let slot = HOSTS_V6.get_ptr(host_slot(src))?;
    // SAFETY: a valid map value; fields are read in place, in order.
    match kind_of(unsafe { &raw const (*slot).kind }) {
        SLOT_ONE => unsafe { addr_is(&raw const (*slot).data.addr, &words(src)).then(|| read(&raw const (*slot).data.rule)) },
        SLOT_MANY => MIGRATED_V6.get(Key::new(128, *src)).copied(),
        _ => None,
    }
}

/// A pointer to a `T` at `off` bytes into the packet, if the packet is long enough.
/// The context of a subprogram. One volatile read of it keeps the compiler from passing the
/// subprogram loaded packet pointers in place of the context pointer (argument promotion),
/// which the verifier would refuse.
#[inline(always)]
fn subprogram_ctx(skb: *mut __sk_buff) -> TcContext {
    // SAFETY: the context pointer the kernel passed to the program.
    unsafe { ptr::read_volatile(&raw const (*skb).len) };
    TcContext::new(skb)
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Result<*const T, Error> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + mem::size_of::<T>() > end {
        return Err(Error::Truncated);
    }
    Ok((start + off) as *const T)
}

fn try_ingress(ctx: &TcContext) -> Result<Verdict, Error> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    match u16::from_be_bytes(unsafe { (*eth).proto }) {
        ETH_P_IP => ingress_v4(ctx),
        ETH_P_IPV6 => ingress_v6(ctx.skb.skb),
        _ => Ok(pass(Counter::Passed)),
    }
}

/// The common packet is decided here, reading only the fields it needs (words, not 16-byte
/// addresses); whatever concerns a migrated client, a tunnel or an ICMP error is handled by a
/// subprogram of its own.
#[inline(always)]
fn ingress_v4(ctx: &TcContext) -> Result<Verdict, Error> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, proto, frag) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).frag) };
    if vihl >> 4 != 4 {
        return Err(Error::Truncated);
    }
    match proto {
        IPPROTO_IPIP => return decap::<false>(ctx.skb.skb),
        IPPROTO_IPV6 => return Ok(drop(Counter::DroppedBad)),
        IPPROTO_TCP | IPPROTO_ICMP => {}
        _ => return Ok(pass(Counter::Passed)),
    }
    if hdr::is_fragment(frag) {
        return Ok(pass(Counter::PassedFragment));
    }
    match vihl & 0xf {
        0..5 => return Err(Error::Truncated),
        5 => {}
        _ => return Ok(pass(Counter::PassedOptions)),
    }
    if proto == IPPROTO_ICMP {
        return icmp::<false>(ctx.skb.skb);
    }
    let tcp: *const TcpHdr = ptr_at(ctx, ETH_LEN + IP4_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (dport, dst) = unsafe { ((*tcp).dport, (*ip).dst) };
    let Some(service) = service_at_v4(u32::from_ne_bytes(dst), dst, dport) else {
        // SAFETY: as above.
        return Ok(if is_answer(unsafe { (*tcp).flags }) { probe_answer::<false>(ctx.skb.skb) } else { pass(Counter::Passed) });
    };
    // SAFETY: as above.
    let Some(rule) = host_rule_v4(unsafe { (*ip).src }) else {
        return Ok(pass(Counter::PassedNotMigrated));
    };
    steer::<false>(ctx.skb.skb, &service, &rule)
}

/// [`ingress_v4`] for IPv6 (a subprogram: its frame does not add to the IPv4 path's).
#[inline(never)]
fn ingress_v6(skb: *mut __sk_buff) -> Result<Verdict, Error> {
    let ctx = &subprogram_ctx(skb);
    let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (vtc, next) = unsafe { ((*ip).vtc, (*ip).next) };
    if vtc >> 4 != 6 {
        return Err(Error::Truncated);
    }
    match next {
        IPPROTO_IPV6 => return decap::<true>(ctx.skb.skb),
        IPPROTO_IPIP => return Ok(drop(Counter::DroppedBad)),
        IPPROTO_TCP => {}
        IPPROTO_ICMPV6 => return icmp::<true>(ctx.skb.skb),
        IPPROTO_FRAGMENT => return Ok(pass(Counter::PassedFragment)),
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_ESP => {
            return Ok(pass(Counter::PassedOptions));
        }
        _ => return Ok(pass(Counter::Passed)),
    }
    let tcp: *const TcpHdr = ptr_at(ctx, ETH_LEN + IP6_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (dport, dst) = unsafe { ((*tcp).dport, &raw const (*ip).dst) };
    // SAFETY: as above.
    let Some(service) = service_at_v6(unsafe { &*dst }, dport) else {
        // SAFETY: as above.
        return Ok(if is_answer(unsafe { (*tcp).flags }) { probe_answer::<true>(ctx.skb.skb) } else { pass(Counter::Passed) });
    };
    // SAFETY: as above.
    let Some(rule) = host_rule_v6(unsafe { &(*ip).src }) else {
        return Ok(pass(Counter::PassedNotMigrated));
    };
    steer::<true>(ctx.skb.skb, &service, &rule)
}

/// A TCP packet of a migrated client (`rule`) to a steered service: forward a new connection,
/// keep a flow that lives here, forward one that does not.
#[inline(never)]
fn steer<const V6: bool>(skb: *mut __sk_buff, service: &ServiceValue, rule: &RuleValue) -> Result<Verdict, Error> {
    let ctx = &subprogram_ctx(skb);
    let v6 = V6;
    let l4 = if v6 { ETH_LEN + IP6_LEN } else { ETH_LEN + IP4_LEN };
    let tcp: *const TcpHdr = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let flags = unsafe { (*tcp).flags };
    match migrated_step(flags, rule, now_if_draining(rule)) {
        Step::Inert => Ok(pass(Counter::PassedNotMigrated)),
        Step::KeepDraining => Ok(pass(Counter::KeptDraining)),
        Step::ForwardNew => {
            clamp_syn(ctx, l4, service.mss_clamp);
            forward::<V6>(ctx.skb.skb, &service.tunnel_src, &rule.target, Counter::ForwardedNew)
        }
        Step::CheckSocket => {
            let found = if v6 { lookup_packet_v6(ctx)? } else { lookup_packet_v4(ctx)? };
            keep_or_forward::<V6>(ctx, found, service, rule, Counter::ForwardedExisting, Counter::ForwardedTimeWait)
        }
    }
}

/// Looks up this IPv4 packet's own flow (checking a listener match for a SYN-cookie ACK).
#[inline(always)]
fn lookup_packet_v4(ctx: &TcContext) -> Result<Found, Error> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    let tcp: *const TcpHdr = ptr_at(ctx, ETH_LEN + IP4_LEN)?;
    // SAFETY: an all-zero tuple is valid; fields read within bounds checked by ptr_at.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    unsafe {
        tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes((*ip).src);
        tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes((*ip).dst);
        tuple.__bindgen_anon_1.ipv4.sport = u16::from_ne_bytes((*tcp).sport);
        tuple.__bindgen_anon_1.ipv4.dport = u16::from_ne_bytes((*tcp).dport);
    }
    // SAFETY: as above.
    let flags = unsafe { (*tcp).flags };
    Ok(lookup_flow(ctx, &mut tuple, 12, Some((ip.cast(), IP4_LEN as u32, tcp, flags))))
}

/// [`lookup_packet_v4`] for IPv6.
#[inline(always)]
fn lookup_packet_v6(ctx: &TcContext) -> Result<Found, Error> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
    let tcp: *const TcpHdr = ptr_at(ctx, ETH_LEN + IP6_LEN)?;
    // SAFETY: as in lookup_packet_v4.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    unsafe {
        tuple.__bindgen_anon_1.ipv6.saddr = words(&(*ip).src);
        tuple.__bindgen_anon_1.ipv6.daddr = words(&(*ip).dst);
        tuple.__bindgen_anon_1.ipv6.sport = u16::from_ne_bytes((*tcp).sport);
        tuple.__bindgen_anon_1.ipv6.dport = u16::from_ne_bytes((*tcp).dport);
    }
    // SAFETY: as above.
    let flags = unsafe { (*tcp).flags };
    Ok(lookup_flow(ctx, &mut tuple, 36, Some((ip.cast(), IP6_LEN as u32, tcp, flags))))
}

/// ICMP (ICMPv6 when `V6`) error about a flow of a steered service: relayed to the target the
/// flow lives on (by the quoted flow: only 8 bytes of its TCP header are guaranteed).
/// Addresses are read in place in the packet: copies would not fit the stack.
#[inline(never)]
fn icmp<const V6: bool>(skb: *mut __sk_buff) -> Result<Verdict, Error> {
    let ctx = &subprogram_ctx(skb);
    let l4 = if V6 { ETH_LEN + IP6_LEN } else { ETH_LEN + IP4_LEN };
    let icmp: *const IcmpHdr = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let ty = unsafe { (*icmp).ty };
    if !(if V6 { icmp6_is_error(ty) } else { icmp4_is_error(ty) }) {
        return Ok(pass(Counter::Passed));
    }
    let inner = l4 + mem::size_of::<IcmpHdr>();
    // The quoted packet went from our service to the client.
    let mut key = ServiceKey { addr: [0; 16], port: [0; 2], _pad: [0; 2] };
    // SAFETY: an all-zero tuple is valid.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    let rule = if V6 {
        let q: *const Ipv6Hdr = ptr_at(ctx, inner)?;
        // RFC 792/4443: an error quotes at least 8 bytes of the TCP header.
        let p: *const [u8; 8] = ptr_at(ctx, inner + IP6_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            if (*q).next != IPPROTO_TCP {
                return Ok(pass(Counter::Passed));
            }
            key.addr = (*q).src;
            key.port = [(*p)[0], (*p)[1]];
            tuple.__bindgen_anon_1.ipv6.saddr = words(&(*q).dst);
            tuple.__bindgen_anon_1.ipv6.daddr = words(&(*q).src);
            tuple.__bindgen_anon_1.ipv6.sport = u16::from_ne_bytes([(*p)[2], (*p)[3]]);
            tuple.__bindgen_anon_1.ipv6.dport = u16::from_ne_bytes([(*p)[0], (*p)[1]]);
            host_rule_v6(&(*q).dst)
        }
    } else {
        let q: *const Ipv4Hdr = ptr_at(ctx, inner)?;
        let p: *const [u8; 8] = ptr_at(ctx, inner + IP4_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            if (*q).proto != IPPROTO_TCP {
                return Ok(pass(Counter::Passed));
            }
            if (*q).vihl & 0xf != 5 {
                return Ok(pass(Counter::PassedOptions));
            }
            key.addr[10] = 0xff;
            key.addr[11] = 0xff;
            key.addr[12..16].copy_from_slice(&(*q).src);
            key.port = [(*p)[0], (*p)[1]];
            tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes((*q).dst);
            tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes((*q).src);
            tuple.__bindgen_anon_1.ipv4.sport = u16::from_ne_bytes([(*p)[2], (*p)[3]]);
            tuple.__bindgen_anon_1.ipv4.dport = u16::from_ne_bytes([(*p)[0], (*p)[1]]);
            host_rule_v4((*q).dst)
        }
    };
    // SAFETY: map values are plain data.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return Ok(pass(Counter::Passed));
    };
    let Some(rule) = rule else {
        return Ok(pass(Counter::PassedNotMigrated));
    };
    if migrated_step(TCP_ACK, &rule, now_if_draining(&rule)) == Step::Inert {
        return Ok(pass(Counter::PassedNotMigrated));
    }
    let found = lookup_flow(ctx, &mut tuple, if V6 { 36 } else { 12 }, None);
    keep_or_forward::<V6>(ctx, found, &service, &rule, Counter::IcmpRelayed, Counter::IcmpRelayed)
}

#[inline(always)]
fn now_if_draining(rule: &RuleValue) -> u64 {
    // SAFETY: a plain helper call.
    if rule.drain_until_ns == 0 { 0 } else { unsafe { bpf_ktime_get_ns() } }
}

/// Looks the flow up among this namespace's sockets. With `cookie`, a listener match is
/// checked for a SYN-cookie ACK of this host's own handshake. Every reference is released.
#[inline(always)]
fn lookup_flow(ctx: &TcContext, tuple: &mut bpf_sock_tuple, tuple_len: u32, cookie: Option<(*const u8, u32, *const TcpHdr, u8)>) -> Found {
    // SAFETY: tuple is a valid stack object of tuple_len bytes; the returned reference is
    // released on every path below.
    let sk: *mut bpf_sock = unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), ptr::from_mut(tuple), tuple_len, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return Found::Nothing;
    }
    // SAFETY: sk is a valid socket reference.
    let state = unsafe { (*sk).state };
    let found = decide::found_socket(state, || match cookie {
        Some((iph, iph_len, th, flags)) if flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK => {
            // SAFETY: iph and th point into the packet, bounds checked by the caller; sk is
            // the listener the lookup returned, still referenced.
            unsafe { bpf_tcp_check_syncookie(sk.cast(), iph as *mut _, iph_len, th as *mut _, TCP_LEN as u32) == 0 }
        }
        _ => false,
    });
    // SAFETY: releasing the reference taken above.
    unsafe { bpf_sk_release(sk.cast()) };
    found
}

/// Keeps the packet or forwards it to the target (see [`decide::place`]), counted as
/// `forwarded` when no socket is here and as `past_time_wait` when only a time-wait socket is.
#[inline(always)]
fn keep_or_forward<const V6: bool>(ctx: &TcContext, found: Found, service: &ServiceValue, rule: &RuleValue, forwarded: Counter, past_time_wait: Counter) -> Result<Verdict, Error> {
    match decide::place(found, rule) {
        Place::Local => Ok(pass(Counter::KeptLocal)),
        Place::Syncookie => Ok(pass(Counter::KeptSyncookie)),
        Place::Target => forward::<V6>(ctx.skb.skb, &service.tunnel_src, &rule.target, forwarded),
        Place::TargetPastTimeWait => {
            let verdict = forward::<V6>(ctx.skb.skb, &service.tunnel_src, &rule.target, past_time_wait)?;
            count_extra(past_time_wait);
            Ok(verdict)
        }
    }
}

/// A SYN-ACK or RST (not for a steered service) from one of our service addresses to that
/// service's tunnel source is a target's answer to a readiness probe: recorded for user space
/// and dropped. Anything else passes.
#[inline(never)]
fn probe_answer<const V6: bool>(skb: *mut __sk_buff) -> Verdict {
    let ctx = &subprogram_ctx(skb);
    let l4 = if V6 { ETH_LEN + IP6_LEN } else { ETH_LEN + IP4_LEN };
    let Ok(tcp) = ptr_at::<TcpHdr>(ctx, l4) else { return pass(Counter::Passed) };
    // SAFETY: bounds checked by ptr_at.
    let (sport, dport, flags) = unsafe { ((*tcp).sport, (*tcp).dport, (*tcp).flags) };
    // (service, whether the packet's destination is its tunnel source)
    let found = if V6 {
        let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else { return pass(Counter::Passed) };
        // SAFETY: bounds checked by ptr_at; addresses are read in place.
        unsafe { service_at_v6(&(*ip).src, sport).map(|s| addr_is(&raw const s.tunnel_src, &words(&(*ip).dst))) }
    } else {
        let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else { return pass(Counter::Passed) };
        // SAFETY: as above.
        unsafe {
            let (src, dst) = ((*ip).src, (*ip).dst);
            service_at_v4(u32::from_ne_bytes(src), src, sport).map(|s| s.tunnel_src == v4_mapped(dst))
        }
    };
    if found != Some(true) {
        return pass(Counter::Passed);
    }
    let Some(probe) = PROBES.get_ptr_mut(u32::from(u16::from_be_bytes(dport))) else {
        return pass(Counter::Passed);
    };
    // SAFETY: entry created by user space for this probe.
    unsafe {
        (*probe).tcp_flags = flags;
        (*probe).seen_ns = bpf_ktime_get_ns();
    }
    drop(Counter::ProbeAnswer)
}

/// Lowers the MSS option of the SYN (or SYN-ACK) at `l4` to `clamp` so tunnelled packets fit
/// the uplink; counts a clamp that was needed but failed. Nearly every stack sends MSS as the
/// first option, which is read and written in place here; other layouts are scanned by a
/// subprogram.
#[inline(always)]
fn clamp_syn(ctx: &TcContext, l4: usize, clamp: u16) -> bool {
    let r = match clamp_first(ctx, l4, clamp) {
        Some(r) => r,
        None => clamp_scan(ctx.skb.skb, l4, clamp),
    };
    r.unwrap_or_else(|()| {
        count(Counter::ErrorClamp);
        false
    })
}

/// The clamp when MSS is the first option: `None` when it is not.
#[inline(always)]
fn clamp_first(ctx: &TcContext, l4: usize, clamp: u16) -> Option<Result<bool, ()>> {
    let tcp: *const TcpHdr = ptr_at(ctx, l4).ok()?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*tcp).doff_res } >> 4 <= 5 || clamp == 0 {
        return Some(Ok(false));
    }
    let first: *const [u8; 4] = ptr_at(ctx, l4 + TCP_LEN).ok()?;
    // SAFETY: bounds checked by ptr_at.
    let o = unsafe { *first };
    if o[0] != 2 || o[1] != 4 {
        return None;
    }
    let old = u16::from_be_bytes([o[2], o[3]]);
    let Some(new) = decide::clamped(old, clamp) else { return Some(Ok(false)) };
    // SAFETY: bounds checked by ptr_at; TC programs may write packet data (the verifier
    // unclones a shared skb first).
    unsafe { *first.cast_mut().cast::<[u8; 2]>().add(1) = new.to_be_bytes() };
    Some(ctx.l4_csum_replace(l4 + TCP_CSUM_OFF, u64::from(old.to_be()), u64::from(new.to_be()), 2).map(|()| true).map_err(|_| ()))
}

/// The clamp for any option layout: `Ok(true)`: clamped; `Ok(false)`: nothing to do; `Err`:
/// the MSS was too large and could not be changed.
#[inline(never)]
fn clamp_scan(skb: *mut __sk_buff, l4: usize, clamp: u16) -> Result<bool, ()> {
    let ctx = &subprogram_ctx(skb);
    let tcp: *const TcpHdr = ptr_at(ctx, l4).map_err(|_| ())?;
    // SAFETY: bounds checked by ptr_at.
    let doff = usize::from(unsafe { (*tcp).doff_res } >> 4) * 4;
    if doff <= TCP_LEN || clamp == 0 {
        return Ok(false);
    }
    let opt_off = l4 + TCP_LEN;
    let opt_len = doff - TCP_LEN;
    let mut opts = [0u8; decide::OPTS_BUF];
    #[expect(clippy::cast_possible_truncation, reason = "at most 40")]
    let n = opt_len as u32;
    if n == 0 || n > 40 {
        return Ok(false);
    }
    // SAFETY: opts has 64 bytes and 1 <= n <= 40.
    let rc = unsafe { bpf_skb_load_bytes(skb.cast(), opt_off as u32, opts.as_mut_ptr().cast(), n) };
    if rc != 0 {
        return Ok(false);
    }
    let Some((i, old)) = decide::find_mss(&opts, opt_len) else { return Ok(false) };
    let Some(new) = decide::clamped(old, clamp) else { return Ok(false) };
    ctx.store(opt_off + i + 2, &new.to_be_bytes(), 0).map_err(|_| ())?;
    ctx.l4_csum_replace(l4 + TCP_CSUM_OFF, u64::from(old.to_be()), u64::from(new.to_be()), 2).map(|()| true).map_err(|_| ())
}

/// Encapsulates the packet (IP-in-IP, or IPv6-in-IPv6 when `V6`) from `src` to `dst` and sends
/// it out of the interface it arrived on, resolving the next hop's MAC address.
///
/// A GSO packet (large, segmented later) gets its room with `bpf_skb_adjust_room` and the
/// encapsulation flags, so that segmentation knows the inner headers. Any other packet gets it
/// with the cheaper `bpf_skb_change_head`: the redirect strips the Ethernet header and takes
/// the outer IP header for the network header, which is all that packet needs.
#[inline(never)]
fn forward<const V6: bool>(skb: *mut __sk_buff, src: &Addr, dst: &Addr, counter: Counter) -> Result<Verdict, Error> {
    let ctx = &subprogram_ctx(skb);
    let outer_len = if V6 { IP6_LEN } else { IP4_LEN };
    // Everything the new headers need, read before the packet changes.
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let ip: *const [u8; 8] = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (mac, first) = unsafe { (*eth, *ip) };
    let inner_len = ctx.len().saturating_sub(ETH_LEN as u32);
    // SAFETY: reading the context the kernel passed.
    let gso = unsafe { ptr::read_volatile(&raw const (*skb).gso_size) } != 0;
    if gso {
        let flags = if V6 { BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 } else { BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 };
        ctx.adjust_room(outer_len as i32, BPF_ADJ_ROOM_MAC, u64::from(flags)).map_err(|_| Error::ForwardKept)?;
    } else {
        // SAFETY: plain helper call on our context.
        if unsafe { bpf_skb_change_head(skb.cast(), outer_len as u32, 0) } != 0 {
            return Err(Error::ForwardKept);
        }
        let at: *const EthHdr = ptr_at(ctx, 0).map_err(|_| Error::ForwardLost)?;
        // SAFETY: bounds checked by ptr_at after the room was made.
        unsafe { ptr::write_unaligned(at.cast_mut(), mac) };
    }
    if V6 {
        let payload = u16::try_from(inner_len).unwrap_or(u16::MAX).to_be_bytes();
        // Version, traffic class and flow label of the inner header.
        let mut outer = [0u8; IP6_LEN];
        outer[0..4].copy_from_slice(&first[0..4]);
        outer[4..6].copy_from_slice(&payload);
        outer[6] = IPPROTO_IPV6;
        outer[7] = 64;
        outer[8..24].copy_from_slice(src);
        outer[24..40].copy_from_slice(dst);
        let at: *const [u8; IP6_LEN] = ptr_at(ctx, ETH_LEN).map_err(|_| Error::ForwardLost)?;
        // SAFETY: bounds checked by ptr_at after the room was made.
        unsafe { ptr::write_unaligned(at.cast_mut(), outer) };
    } else {
        let (Some(src4), Some(dst4)) = (as_v4(src), as_v4(dst)) else {
            return Err(Error::ForwardLost);
        };
        let total = u16::try_from(inner_len + IP4_LEN as u32).unwrap_or(u16::MAX).to_be_bytes();
        // The inner header's TOS, id and DF bit: a non-DF outer datagram that gets fragmented
        // on the way needs a real id.
        let (tos, id, df) = (first[1], [first[4], first[5]], first[6] & 0x40);
        let csum = decide::outer_v4_checksum(tos, total, id, df, src4, dst4).to_be_bytes();
        let outer: [u8; IP4_LEN] =
            [0x45, tos, total[0], total[1], id[0], id[1], df, 0, 64, IPPROTO_IPIP, csum[0], csum[1], src4[0], src4[1], src4[2], src4[3], dst4[0], dst4[1], dst4[2], dst4[3]];
        let at: *const [u8; IP4_LEN] = ptr_at(ctx, ETH_LEN).map_err(|_| Error::ForwardLost)?;
        // SAFETY: bounds checked by ptr_at after the room was made.
        unsafe { ptr::write_unaligned(at.cast_mut(), outer) };
    }
    // SAFETY: plain helper call; ifindex is the interface the packet arrived on.
    let rc = unsafe { bpf_redirect_neigh((*skb).ifindex, ptr::null_mut(), 0, 0) };
    if rc as i32 == TC_ACT_REDIRECT { Ok(Verdict { action: TC_ACT_REDIRECT, counter }) } else { Err(Error::ForwardLost) }
}

/// Strips the outer header of a tunnelled packet (IP-in-IP, or IPv6-in-IPv6 when `v6`) from
/// a configured sibling whose inner packet is for a service adopted here; drops the rest.
#[inline(never)]
fn decap<const V6: bool>(skb: *mut __sk_buff) -> Result<Verdict, Error> {
    let ctx = &subprogram_ctx(skb);
    let v6 = V6;
    let (outer_src, outer_len, flags) = if v6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        (unsafe { (*ip).src }, IP6_LEN, BPF_F_ADJ_ROOM_DECAP_L3_IPV6)
    } else {
        let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let (vihl, frag, src) = unsafe { ((*ip).vihl, (*ip).frag, (*ip).src) };
        if vihl != 0x45 || hdr::is_fragment(frag) {
            return Err(Error::BadTunnel);
        }
        (v4_mapped(src), IP4_LEN, BPF_F_ADJ_ROOM_DECAP_L3_IPV4)
    };
    if SIBLINGS.get_ptr(outer_src).is_none() {
        return Err(Error::BadTunnel);
    }
    let key = if v6 { inner_target_v6(ctx, ETH_LEN + IP6_LEN)? } else { inner_target_v4(ctx, ETH_LEN + IP4_LEN)? };
    if ADOPTED.get_ptr(key).is_none() {
        return Err(Error::NotAdopted);
    }
    ctx.adjust_room(-(outer_len as i32), BPF_ADJ_ROOM_MAC, u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | flags)).map_err(|_| Error::BadTunnel)?;
    Ok(pass(Counter::Decapsulated))
}

/// The adopted service a tunnelled IPv4 packet at `off` is for: the destination and TCP port
/// of a steered segment or probe, or of the flow quoted by a relayed ICMP error.
#[inline(always)]
fn inner_target_v4(ctx: &TcContext, off: usize) -> Result<ServiceKey, Error> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, off).map_err(|_| Error::BadTunnel)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { *ip };
    if h.vihl != 0x45 || h.is_fragment() {
        return Err(Error::BadTunnel);
    }
    let l4 = off + IP4_LEN;
    let port = match h.proto {
        IPPROTO_TCP => quoted_port(ctx, l4 + 2)?,
        IPPROTO_ICMP => {
            let q: *const Ipv4Hdr = ptr_at(ctx, l4 + mem::size_of::<IcmpHdr>()).map_err(|_| Error::BadTunnel)?;
            // SAFETY: bounds checked by ptr_at.
            if unsafe { (*q).vihl } != 0x45 {
                return Err(Error::NotAdopted);
            }
            quoted_port(ctx, l4 + mem::size_of::<IcmpHdr>() + IP4_LEN)?
        }
        _ => return Err(Error::NotAdopted),
    };
    Ok(ServiceKey { addr: v4_mapped(h.dst), port, _pad: [0; 2] })
}

/// [`inner_target_v4`] for IPv6.
#[inline(always)]
fn inner_target_v6(ctx: &TcContext, off: usize) -> Result<ServiceKey, Error> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, off).map_err(|_| Error::BadTunnel)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { *ip };
    if h.vtc >> 4 != 6 {
        return Err(Error::BadTunnel);
    }
    let l4 = off + IP6_LEN;
    let port = match h.next {
        IPPROTO_TCP => quoted_port(ctx, l4 + 2)?,
        IPPROTO_ICMPV6 => quoted_port(ctx, l4 + mem::size_of::<IcmpHdr>() + IP6_LEN)?,
        _ => return Err(Error::NotAdopted),
    };
    Ok(ServiceKey { addr: h.dst, port, _pad: [0; 2] })
}

#[inline(always)]
fn quoted_port(ctx: &TcContext, off: usize) -> Result<[u8; 2], Error> {
    let p: *const [u8; 2] = ptr_at(ctx, off).map_err(|_| Error::BadTunnel)?;
    // SAFETY: bounds checked by ptr_at.
    Ok(unsafe { *p })
}

/// On a target's uplink egress: lowers the MSS announced by SYN-ACKs of adopted services, so
/// the client's segments, tunnelled by the origin, fit the uplink. (The origin clamps the
/// client's SYN, which bounds what the target sends; what the client sends is bounded only by
/// the SYN-ACK, which never passes the origin.)
#[classifier]
pub fn redirector_egress(ctx: TcContext) -> i32 {
    if try_egress(&ctx).unwrap_or(false) {
        count(Counter::ClampedSynAck);
    }
    TCX_NEXT
}

fn try_egress(ctx: &TcContext) -> Result<bool, Error> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let (src, l4) = match u16::from_be_bytes(unsafe { (*eth).proto }) {
        ETH_P_IP => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { *ip };
            if h.proto != IPPROTO_TCP || h.vihl != 0x45 || h.is_fragment() {
                return Ok(false);
            }
            (v4_mapped(h.src), ETH_LEN + IP4_LEN)
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { *ip };
            if h.next != IPPROTO_TCP {
                return Ok(false);
            }
            (h.src, ETH_LEN + IP6_LEN)
        }
        _ => return Ok(false),
    };
    let tcp: *const TcpHdr = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let t = unsafe { *tcp };
    if t.flags & (TCP_SYN | TCP_ACK) != (TCP_SYN | TCP_ACK) {
        return Ok(false);
    }
    let Some(adopted) = (unsafe { ADOPTED.get(ServiceKey { addr: src, port: t.sport, _pad: [0; 2] }) }) else {
        return Ok(false);
    };
    let clamp = adopted.mss_clamp;
    Ok(clamp_syn(ctx, l4, clamp))
}

const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 4;

/// On the application's cgroup: counts established connections per client address, up when
/// a connection is accepted, down when it leaves ESTABLISHED.
#[sock_ops]
pub fn redirector_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            add_load(&ctx, 1);
            // Ask for state changes of this socket, to count it down.
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(0) == TCP_ESTABLISHED && ctx.arg(1) != TCP_ESTABLISHED => {
            add_load(&ctx, -1);
        }
        _ => {}
    }
    1
}

/// Adds `delta` to `*p` atomically. The result is not used, so this is the BPF atomic add
/// every kernel and CPU version has (no fetch).
///
/// # Safety
/// `p` points to a valid, 8-byte aligned map value.
#[inline(always)]
unsafe fn atomic_add(p: *mut i64, delta: i64) {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(p, delta) };
}

#[inline(always)]
fn add_load(ctx: &SockOpsContext, delta: i64) {
    let addr = match ctx.family() {
        2 => v4_mapped(ctx.remote_ip4().to_ne_bytes()),
        10 => {
            let w = ctx.remote_ip6();
            let mut a = [0u8; 16];
            a[0..4].copy_from_slice(&w[0].to_ne_bytes());
            a[4..8].copy_from_slice(&w[1].to_ne_bytes());
            a[8..12].copy_from_slice(&w[2].to_ne_bytes());
            a[12..16].copy_from_slice(&w[3].to_ne_bytes());
            a
        }
        _ => return,
    };
    if let Some(v) = LOAD.get_ptr_mut(addr) {
        // SAFETY: a valid, aligned map value shared by all CPUs: changed atomically.
        unsafe { atomic_add(v, delta) };
    } else if LOAD.insert(addr, delta, 1 /* BPF_NOEXIST */).is_err() {
        // Another CPU created the entry meanwhile.
        if let Some(v) = LOAD.get_ptr_mut(addr) {
            // SAFETY: as above.
            unsafe { atomic_add(v, delta) };
        }
    }
    let Some(total) = LOAD_TOTAL.get_ptr_mut(0) else { return };
    // SAFETY: as above.
    unsafe { atomic_add(total, delta) };
    if delta <= 0 {
        return;
    }
    // Read back: it may already include other CPUs' changes, which only moves the report by a
    // connection or two.
    // SAFETY: as above.
    let now = unsafe { ptr::read_volatile(total) };
    let Some(ctl) = LOAD_CTL.get_ptr_mut(0) else { return };
    // SAFETY: a valid map value; a racing CPU may report the same crossing once more, which
    // user space tolerates.
    unsafe {
        if (*ctl).armed != 0 && now > 0 && now.cast_unsigned() > (*ctl).high {
            (*ctl).armed = 0;
            let _ = LOAD_EVENTS.output::<LoadEvent>(LoadEvent { at_ns: bpf_ktime_get_ns(), total: now.cast_unsigned() }, 0);
        }
    }
}

/// Does nothing: the baseline the benchmark measures the classifier against.
#[classifier]
pub fn redirector_empty(_ctx: TcContext) -> i32 {
    TCX_NEXT
}

#[sk_lookup]
pub fn redirector_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: l is the kernel's bpf_sk_lookup; every field is read once, at its own offset and
    // size (the verifier rejects loads through a computed context pointer).
    let (family, protocol, port, ip4, ip6) = unsafe {
        (
            ptr::read_volatile(&raw const (*l).family),
            ptr::read_volatile(&raw const (*l).protocol),
            ptr::read_volatile(&raw const (*l).local_port),
            ptr::read_volatile(&raw const (*l).local_ip4),
            [
                ptr::read_volatile(&raw const (*l).local_ip6[0]),
                ptr::read_volatile(&raw const (*l).local_ip6[1]),
                ptr::read_volatile(&raw const (*l).local_ip6[2]),
                ptr::read_volatile(&raw const (*l).local_ip6[3]),
            ],
        )
    };
    if protocol != u32::from(IPPROTO_TCP) {
        return sk_action::SK_PASS;
    }
    let addr = match family {
        2 => v4_mapped(ip4.to_ne_bytes()),
        10 => {
            let mut a = [0u8; 16];
            a[0..4].copy_from_slice(&ip6[0].to_ne_bytes());
            a[4..8].copy_from_slice(&ip6[1].to_ne_bytes());
            a[8..12].copy_from_slice(&ip6[2].to_ne_bytes());
            a[12..16].copy_from_slice(&ip6[3].to_ne_bytes());
            a
        }
        _ => return sk_action::SK_PASS,
    };
    #[expect(clippy::cast_possible_truncation, reason = "ports are 16 bits")]
    let key = ServiceKey::new(addr, port as u16);
    if ADOPTED.get_ptr(key).is_none() {
        return sk_action::SK_PASS;
    }
    if LISTENERS.redirect_sk_lookup(&ctx, key, 0).is_ok() {
        count(Counter::SkAssigned);
    } else {
        // Adopted, but no listener registered (or it closed): the connection is refused.
        count(Counter::SkNoListener);
    }
    sk_action::SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
