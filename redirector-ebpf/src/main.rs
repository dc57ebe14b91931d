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

mod hdr;

use core::{mem, ptr};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT, bpf_sock, bpf_sock_tuple, sk_action,
    },
    helpers::generated::{
        bpf_ktime_get_ns, bpf_redirect_neigh, bpf_skb_load_bytes, bpf_sk_release, bpf_skc_lookup_tcp,
        bpf_tcp_check_syncookie,
    },
    macros::{classifier, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruPerCpuHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, SockOpsContext, TcContext},
};
use hdr::{EthHdr, IcmpHdr, Ipv4Hdr, Ipv6Hdr, TcpHdr};
use redirector_common::{
    Addr, AdoptedValue, Counter, MAX_LISTENERS, MAX_PROBES, MAX_RULES, MAX_CLIENTS, MAX_SERVICES, MAX_SIBLINGS, NET_WORDS_V4, PORT_WORDS, ProbeValue,
    RuleValue, ServiceKey, ServiceValue, SiblingValue, as_v4,
    net_v4_bit,
    decide::{
        self, Found, Step, TCP_ACK, TCP_RST, TCP_SYN, icmp4_is_error, icmp6_is_error,
        migrated_step, stays_local,
    },
    v4_mapped,
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
#[map]
static PORTS: Array<u64> = Array::pinned(PORT_WORDS, 0);
#[map]
static NETS_V4: Array<u64> = Array::pinned(NET_WORDS_V4, 0);
/// Established connections per client address, per CPU (a connection may open on one CPU and
/// close on another, so one CPU's value can be negative; the sum is the count).
#[map]
static LOAD: LruPerCpuHashMap<Addr, i64> = LruPerCpuHashMap::pinned(MAX_CLIENTS, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

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
const TCP_LISTEN: u32 = 10;
const TC_ACT_REDIRECT: i32 = 7;
/// Offset of the TCP checksum in its header.
const TCP_CSUM_OFF: usize = 16;

/// What the classifier does with a packet, and which counter says so.
#[derive(Clone, Copy)]
struct Verdict {
    action: i32,
    counter: Counter,
}

const fn pass(counter: Counter) -> Verdict {
    Verdict { action: TC_ACT_OK as i32, counter }
}

const fn drop(counter: Counter) -> Verdict {
    Verdict { action: TC_ACT_SHOT as i32, counter }
}

/// Why a packet could not be handled normally; each maps to a verdict.
#[derive(Clone, Copy)]
enum Error {
    /// Shorter than its headers claim: pass untouched.
    Truncated,
    /// Tunnelled packet that must not be delivered.
    BadTunnel,
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

#[inline(always)]
fn count(counter: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Whether some steered service uses TCP `port` (network order bytes).
#[inline(always)]
fn port_steered(port: [u8; 2]) -> bool {
    let p = u16::from_be_bytes(port);
    PORTS.get(u32::from(p >> 6)).is_some_and(|w| w & (1u64 << (p & 63)) != 0)
}

/// Whether some IPv4 rule may cover `a` (its /24 bit is set).
#[inline(always)]
fn net_v4_may_match(a: [u8; 4]) -> bool {
    let (word, bit) = net_v4_bit(a);
    NETS_V4.get(word).is_none_or(|w| w & (1u64 << bit) != 0)
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
        ETH_P_IPV6 => ingress_v6(ctx),
        _ => Ok(pass(Counter::Passed)),
    }
}

fn ingress_v4(ctx: &TcContext) -> Result<Verdict, Error> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds checked by ptr_at; the header is plain bytes.
    let h = unsafe { *ip };
    if h.vihl >> 4 != 4 {
        return Err(Error::Truncated);
    }
    match h.proto {
        IPPROTO_IPIP => return decap(ctx, v4_mapped(h.src), h.vihl & 0xf == 5 && !h.is_fragment(), true),
        IPPROTO_IPV6 => return Ok(drop(Counter::DroppedBad)),
        IPPROTO_TCP | IPPROTO_ICMP => {}
        _ => return Ok(pass(Counter::Passed)),
    }
    if h.is_fragment() {
        return Ok(pass(Counter::PassedFragment));
    }
    let ihl = h.vihl & 0xf;
    if ihl < 5 {
        return Err(Error::Truncated);
    }
    if ihl > 5 {
        return Ok(pass(Counter::PassedOptions));
    }
    let l4 = ETH_LEN + IP4_LEN;
    if h.proto == IPPROTO_ICMP {
        return icmp_v4(ctx, l4);
    }
    let tcp: *const TcpHdr = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let t = unsafe { *tcp };
    if !port_steered(t.dport) && !port_steered(t.sport) {
        return Ok(pass(Counter::Passed));
    }
    // A client with no rule anywhere in its /24 is not migrated: one array read instead of the
    // service lookup and the trie. (Answers to probes, SYN-ACK or RST, take the full path.)
    let answer_like = t.flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) || t.flags & TCP_RST != 0;
    if !answer_like && port_steered(t.dport) && !net_v4_may_match(h.src) {
        return Ok(pass(Counter::PassedNotMigrated));
    }
    let src = v4_mapped(h.src);
    let dst = v4_mapped(h.dst);
    let Some(service) = (unsafe { SERVICES.get(&ServiceKey { addr: dst, port: t.dport, _pad: [0; 2] }) }) else {
        return Ok(probe_answer(&src, &dst, &t));
    };
    let service = *service;
    let Some(rule) = MIGRATED_V4.get(Key::new(32, h.src)) else {
        return Ok(pass(Counter::PassedNotMigrated));
    };
    let rule = *rule;
    match migrated_step(t.flags, &rule, now_if_draining(&rule)) {
        Step::Inert => Ok(pass(Counter::PassedNotMigrated)),
        Step::KeepDraining => Ok(pass(Counter::KeptDraining)),
        Step::ForwardNew => {
            let _ = clamp_mss(ctx, l4, &t, service.mss_clamp);
            forward(ctx, &service.tunnel_src, &rule.target, false, Counter::ForwardedNew)
        }
        Step::CheckSocket => {
            let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
            tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes(h.src);
            tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(h.dst);
            tuple.__bindgen_anon_1.ipv4.sport = u16::from_ne_bytes(t.sport);
            tuple.__bindgen_anon_1.ipv4.dport = u16::from_ne_bytes(t.dport);
            let found = lookup_flow(ctx, &mut tuple, 12, Some((ip.cast(), IP4_LEN as u32, tcp, t.flags)));
            keep_or_forward(ctx, found, &service, &rule, false, Counter::ForwardedExisting)
        }
    }
}

fn ingress_v6(ctx: &TcContext) -> Result<Verdict, Error> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds checked by ptr_at; plain bytes.
    let h = unsafe { *ip };
    if h.vtc >> 4 != 6 {
        return Err(Error::Truncated);
    }
    match h.next {
        IPPROTO_IPV6 => return decap(ctx, h.src, true, false),
        IPPROTO_IPIP => return Ok(drop(Counter::DroppedBad)),
        IPPROTO_TCP | IPPROTO_ICMPV6 => {}
        IPPROTO_FRAGMENT => return Ok(pass(Counter::PassedFragment)),
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_ESP => {
            return Ok(pass(Counter::PassedOptions));
        }
        _ => return Ok(pass(Counter::Passed)),
    }
    let l4 = ETH_LEN + IP6_LEN;
    if h.next == IPPROTO_ICMPV6 {
        return icmp_v6(ctx, l4);
    }
    let tcp: *const TcpHdr = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let t = unsafe { *tcp };
    if !port_steered(t.dport) && !port_steered(t.sport) {
        return Ok(pass(Counter::Passed));
    }
    let Some(service) = (unsafe { SERVICES.get(&ServiceKey { addr: h.dst, port: t.dport, _pad: [0; 2] }) }) else {
        return Ok(probe_answer(&h.src, &h.dst, &t));
    };
    let service = *service;
    let Some(rule) = MIGRATED_V6.get(Key::new(128, h.src)) else {
        return Ok(pass(Counter::PassedNotMigrated));
    };
    let rule = *rule;
    match migrated_step(t.flags, &rule, now_if_draining(&rule)) {
        Step::Inert => Ok(pass(Counter::PassedNotMigrated)),
        Step::KeepDraining => Ok(pass(Counter::KeptDraining)),
        Step::ForwardNew => {
            let _ = clamp_mss(ctx, l4, &t, service.mss_clamp);
            forward(ctx, &service.tunnel_src, &rule.target, true, Counter::ForwardedNew)
        }
        Step::CheckSocket => {
            let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
            tuple.__bindgen_anon_1.ipv6.saddr = addr_words(&h.src);
            tuple.__bindgen_anon_1.ipv6.daddr = addr_words(&h.dst);
            tuple.__bindgen_anon_1.ipv6.sport = u16::from_ne_bytes(t.sport);
            tuple.__bindgen_anon_1.ipv6.dport = u16::from_ne_bytes(t.dport);
            let found = lookup_flow(ctx, &mut tuple, 36, Some((ip.cast(), IP6_LEN as u32, tcp, t.flags)));
            keep_or_forward(ctx, found, &service, &rule, true, Counter::ForwardedExisting)
        }
    }
}

/// ICMP error about a flow of a steered service: relay it to the target the flow lives on.
fn icmp_v4(ctx: &TcContext, l4: usize) -> Result<Verdict, Error> {
    let icmp: *const IcmpHdr = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    if !icmp4_is_error(unsafe { (*icmp).ty }) {
        return Ok(pass(Counter::Passed));
    }
    let inner_off = l4 + mem::size_of::<IcmpHdr>();
    let inner: *const Ipv4Hdr = ptr_at(ctx, inner_off)?;
    // SAFETY: bounds checked by ptr_at.
    let q = unsafe { *inner };
    if q.proto != IPPROTO_TCP {
        return Ok(pass(Counter::Passed));
    }
    if q.vihl & 0xf != 5 {
        return Ok(pass(Counter::PassedOptions));
    }
    // Only 8 bytes of the quoted TCP header are guaranteed: the ports and sequence number.
    let ports: *const [u8; 8] = ptr_at(ctx, inner_off + IP4_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let p = unsafe { *ports };
    // The quoted packet went from our service to the client.
    let Some(service) = (unsafe { SERVICES.get(&ServiceKey { addr: v4_mapped(q.src), port: [p[0], p[1]], _pad: [0; 2] }) }) else {
        return Ok(pass(Counter::Passed));
    };
    let service = *service;
    let Some(rule) = MIGRATED_V4.get(Key::new(32, q.dst)) else {
        return Ok(pass(Counter::PassedNotMigrated));
    };
    let rule = *rule;
    if migrated_step(TCP_ACK, &rule, now_if_draining(&rule)) == Step::Inert {
        return Ok(pass(Counter::PassedNotMigrated));
    }
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes(q.dst);
    tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(q.src);
    tuple.__bindgen_anon_1.ipv4.sport = u16::from_ne_bytes([p[2], p[3]]);
    tuple.__bindgen_anon_1.ipv4.dport = u16::from_ne_bytes([p[0], p[1]]);
    let found = lookup_flow(ctx, &mut tuple, 12, None);
    keep_or_forward(ctx, found, &service, &rule, false, Counter::IcmpRelayed)
}

fn icmp_v6(ctx: &TcContext, l4: usize) -> Result<Verdict, Error> {
    let icmp: *const IcmpHdr = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    if !icmp6_is_error(unsafe { (*icmp).ty }) {
        return Ok(pass(Counter::Passed));
    }
    let inner_off = l4 + mem::size_of::<IcmpHdr>();
    let inner: *const Ipv6Hdr = ptr_at(ctx, inner_off)?;
    // SAFETY: bounds checked by ptr_at.
    let q = unsafe { *inner };
    if q.next != IPPROTO_TCP {
        return Ok(pass(Counter::Passed));
    }
    let ports: *const [u8; 8] = ptr_at(ctx, inner_off + IP6_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let p = unsafe { *ports };
    let Some(service) = (unsafe { SERVICES.get(&ServiceKey { addr: q.src, port: [p[0], p[1]], _pad: [0; 2] }) }) else {
        return Ok(pass(Counter::Passed));
    };
    let service = *service;
    let Some(rule) = MIGRATED_V6.get(Key::new(128, q.dst)) else {
        return Ok(pass(Counter::PassedNotMigrated));
    };
    let rule = *rule;
    if migrated_step(TCP_ACK, &rule, now_if_draining(&rule)) == Step::Inert {
        return Ok(pass(Counter::PassedNotMigrated));
    }
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    tuple.__bindgen_anon_1.ipv6.saddr = addr_words(&q.dst);
    tuple.__bindgen_anon_1.ipv6.daddr = addr_words(&q.src);
    tuple.__bindgen_anon_1.ipv6.sport = u16::from_ne_bytes([p[2], p[3]]);
    tuple.__bindgen_anon_1.ipv6.dport = u16::from_ne_bytes([p[0], p[1]]);
    let found = lookup_flow(ctx, &mut tuple, 36, None);
    keep_or_forward(ctx, found, &service, &rule, true, Counter::IcmpRelayed)
}

#[inline(always)]
fn now_if_draining(rule: &RuleValue) -> u64 {
    if rule.drain_until_ns == 0 { 0 } else { unsafe { bpf_ktime_get_ns() } }
}

#[inline(always)]
fn addr_words(a: &Addr) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Looks the flow up among this namespace's sockets. With `cookie`, a listener match is
/// checked for a SYN-cookie ACK of this host's own handshake. Every reference is released.
#[inline(always)]
fn lookup_flow(
    ctx: &TcContext,
    tuple: &mut bpf_sock_tuple,
    tuple_len: u32,
    cookie: Option<(*const u8, u32, *const TcpHdr, u8)>,
) -> Found {
    // SAFETY: tuple is a valid stack object of tuple_len bytes; the returned reference is
    // released on every path below.
    let sk: *mut bpf_sock = unsafe {
        bpf_skc_lookup_tcp(ctx.as_ptr(), ptr::from_mut(tuple), tuple_len, BPF_F_CURRENT_NETNS as u64, 0)
    };
    if sk.is_null() {
        return Found::Nothing;
    }
    // SAFETY: sk is a valid socket reference.
    let state = unsafe { (*sk).state };
    let found = if state == TCP_LISTEN {
        let cookie_ok = match cookie {
            Some((iph, iph_len, th, flags)) if flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK => {
                // SAFETY: iph and th point into the packet, bounds checked by the caller.
                unsafe {
                    bpf_tcp_check_syncookie(sk.cast(), iph as *mut _, iph_len, th as *mut _, mem::size_of::<TcpHdr>() as u32) == 0
                }
            }
            _ => false,
        };
        Found::Listener { cookie_ok }
    } else {
        Found::Flow
    };
    // SAFETY: releasing the reference taken above.
    unsafe { bpf_sk_release(sk.cast()) };
    found
}

#[inline(always)]
fn keep_or_forward(
    ctx: &TcContext,
    found: Found,
    service: &ServiceValue,
    rule: &RuleValue,
    v6: bool,
    forwarded: Counter,
) -> Result<Verdict, Error> {
    match found {
        Found::Listener { cookie_ok: true } => Ok(pass(Counter::KeptSyncookie)),
        f if stays_local(f) => Ok(pass(Counter::KeptLocal)),
        _ => forward(ctx, &service.tunnel_src, &rule.target, v6, forwarded),
    }
}

/// A SYN-ACK or RST from one of our service addresses to our tunnel source is the answer of a
/// target to a readiness probe: record it for user space and drop it. Anything else passes.
#[inline(always)]
fn probe_answer(src: &Addr, dst: &Addr, t: &TcpHdr) -> Verdict {
    let answer = t.flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) || t.flags & TCP_RST != 0;
    if !answer {
        return pass(Counter::Passed);
    }
    // SAFETY: map values are plain data.
    let Some(service) = (unsafe { SERVICES.get(&ServiceKey { addr: *src, port: t.sport, _pad: [0; 2] }) }) else {
        return pass(Counter::Passed);
    };
    if service.tunnel_src != *dst {
        return pass(Counter::Passed);
    }
    let Some(probe) = PROBES.get_ptr_mut(&u32::from(u16::from_be_bytes(t.dport))) else {
        return pass(Counter::Passed);
    };
    // SAFETY: entry created by user space for this probe.
    unsafe {
        (*probe).tcp_flags = t.flags;
        (*probe).seen_ns = bpf_ktime_get_ns();
    }
    drop(Counter::ProbeAnswer)
}

/// Lowers the MSS option of a SYN to `clamp` so tunnelled packets fit the uplink.
#[inline(always)]
fn clamp_mss(ctx: &TcContext, l4: usize, t: &TcpHdr, clamp: u16) -> bool {
    let doff = usize::from(t.doff_res >> 4) * 4;
    if doff <= mem::size_of::<TcpHdr>() || clamp == 0 {
        return false;
    }
    let opt_off = l4 + mem::size_of::<TcpHdr>();
    let opt_len = doff - mem::size_of::<TcpHdr>();
    let mut opts = [0u8; 40];
    #[expect(clippy::cast_possible_truncation, reason = "at most 40")]
    let n = opt_len as u32;
    if n == 0 || n > 40 {
        return false;
    }
    // SAFETY: opts has 40 bytes and 1 <= n <= 40.
    let rc = unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), opt_off as u32, opts.as_mut_ptr().cast(), n) };
    if rc != 0 {
        return false;
    }
    let Some((i, old)) = find_mss(&opts, opt_len) else { return false };
    let Some(new) = decide::clamped(old, clamp) else { return false };
    if ctx.store(opt_off + i + 2, &new.to_be_bytes(), 0).is_err() {
        return false;
    }
    ctx.l4_csum_replace(l4 + TCP_CSUM_OFF, u64::from(old.to_be()), u64::from(new.to_be()), 2).is_ok()
}

/// Offset and value of the MSS option among `len` option bytes.
#[inline(always)]
fn find_mss(opts: &[u8; 40], len: usize) -> Option<(usize, u16)> {
    let mut i = 0usize;
    // Bounded: at most 40 option bytes, each step advances at least one.
    for _ in 0..40 {
        if i >= len {
            return None;
        }
        let kind = *opts.get(i)?;
        match kind {
            0 => return None,
            1 => {
                i += 1;
                continue;
            }
            _ => {}
        }
        let olen = usize::from(*opts.get(i + 1)?);
        if kind == 2 {
            if olen != 4 || i + 4 > len {
                return None;
            }
            return Some((i, u16::from_be_bytes([*opts.get(i + 2)?, *opts.get(i + 3)?])));
        }
        if olen < 2 {
            return None;
        }
        i += olen;
    }
    None
}

/// Encapsulates the packet (IP-in-IP, or IPv6-in-IPv6 when `v6`) from `src` to `dst` and sends
/// it out of the interface it arrived on, resolving the next hop's MAC address.
#[inline(always)]
fn forward(ctx: &TcContext, src: &Addr, dst: &Addr, v6: bool, counter: Counter) -> Result<Verdict, Error> {
    let inner_len = ctx.len().saturating_sub(ETH_LEN as u32);
    if v6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let inner = unsafe { *ip };
        ctx.adjust_room(IP6_LEN as i32, BPF_ADJ_ROOM_MAC, u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV6))
            .map_err(|_| Error::ForwardKept)?;
        let payload = u16::try_from(inner_len).unwrap_or(u16::MAX);
        let outer = Ipv6Hdr {
            vtc: inner.vtc,
            tc_flow: inner.tc_flow,
            payload_len: payload.to_be_bytes(),
            next: IPPROTO_IPV6,
            hop_limit: 64,
            src: *src,
            dst: *dst,
        };
        ctx.store(ETH_LEN, &outer, 0).map_err(|_| Error::ForwardLost)?;
    } else {
        let (Some(src4), Some(dst4)) = (as_v4(src), as_v4(dst)) else {
            return Err(Error::ForwardKept);
        };
        let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let inner = unsafe { *ip };
        ctx.adjust_room(IP4_LEN as i32, BPF_ADJ_ROOM_MAC, u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
            .map_err(|_| Error::ForwardKept)?;
        let total = u16::try_from(inner_len + IP4_LEN as u32).unwrap_or(u16::MAX);
        let mut outer = Ipv4Hdr {
            vihl: 0x45,
            tos: inner.tos,
            tot_len: total.to_be_bytes(),
            id: [0; 2],
            frag: [inner.frag[0] & 0x40, 0],
            ttl: 64,
            proto: IPPROTO_IPIP,
            csum: [0; 2],
            src: src4,
            dst: dst4,
        };
        outer.csum = decide::ipv4_header_checksum(&outer.bytes()).to_be_bytes();
        ctx.store(ETH_LEN, &outer, 0).map_err(|_| Error::ForwardLost)?;
    }
    // SAFETY: plain helper call; ifindex is the interface the packet arrived on.
    let rc = unsafe { bpf_redirect_neigh((*ctx.skb.skb).ifindex, ptr::null_mut(), 0, 0) };
    if rc as i32 == TC_ACT_REDIRECT {
        Ok(Verdict { action: TC_ACT_REDIRECT, counter })
    } else {
        Err(Error::ForwardLost)
    }
}

/// Strips the outer header of a tunnelled packet from a configured sibling; drops the rest.
#[inline(always)]
fn decap(ctx: &TcContext, outer_src: Addr, outer_ok: bool, v4: bool) -> Result<Verdict, Error> {
    if !outer_ok || SIBLINGS.get_ptr(&outer_src).is_none() {
        return Err(Error::BadTunnel);
    }
    let (outer_len, flags) = if v4 {
        let inner: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN + IP4_LEN).map_err(|_| Error::BadTunnel)?;
        // SAFETY: bounds checked by ptr_at.
        if unsafe { (*inner).vihl } >> 4 != 4 {
            return Err(Error::BadTunnel);
        }
        (IP4_LEN, BPF_F_ADJ_ROOM_DECAP_L3_IPV4)
    } else {
        let inner: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN + IP6_LEN).map_err(|_| Error::BadTunnel)?;
        // SAFETY: bounds checked by ptr_at.
        if unsafe { (*inner).vtc } >> 4 != 6 {
            return Err(Error::BadTunnel);
        }
        (IP6_LEN, BPF_F_ADJ_ROOM_DECAP_L3_IPV6)
    };
    ctx.adjust_room(
        -(outer_len as i32),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | flags),
    )
    .map_err(|_| Error::BadTunnel)?;
    Ok(pass(Counter::Decapsulated))
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
    TC_ACT_OK as i32
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
    let Some(adopted) = (unsafe { ADOPTED.get(&ServiceKey { addr: src, port: t.sport, _pad: [0; 2] }) }) else {
        return Ok(false);
    };
    let clamp = adopted.mss_clamp;
    Ok(clamp_mss(ctx, l4, &t, clamp))
}

const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 4;
const TCP_ESTABLISHED: u32 = 1;

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
    if let Some(v) = LOAD.get_ptr_mut(&addr) {
        // SAFETY: this CPU's slot of a per-CPU map.
        unsafe { *v += delta };
    } else if LOAD.insert(&addr, &delta, 1 /* BPF_NOEXIST */).is_err() {
        // Another CPU created the entry meanwhile: this CPU's slot exists now.
        if let Some(v) = LOAD.get_ptr_mut(&addr) {
            // SAFETY: as above.
            unsafe { *v += delta };
        }
    }
}

/// Does nothing: the baseline the benchmark measures the classifier against.
#[classifier]
pub fn redirector_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
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
    if ADOPTED.get_ptr(&key).is_none() {
        return sk_action::SK_PASS;
    }
    if LISTENERS.redirect_sk_lookup(&ctx, key, 0).is_ok() {
        count(Counter::SkAssigned);
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
