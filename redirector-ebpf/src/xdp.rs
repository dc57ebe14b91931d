//! The origin's XDP fast path (`redirector_xdp`, on the uplink before the stack): forwards the
//! TCP packets of migrated clients to their target itself, as Katran does (room for the outer
//! header with `bpf_xdp_adjust_head`, the next hop's address from `bpf_fib_lookup`, out with
//! `XDP_TX`), and only where it decides exactly as the classifier would: the same maps, the same
//! decision functions, the same socket lookup. Everything else goes on (`XDP_PASS`) to the
//! classifier, which stays the reference and decides it as without XDP: other traffic,
//! fragments, IP options and extension headers, ICMP, tunnels, probe answers, services without
//! [`SERVICE_XDP`], frozen flows, clients with no rule, draining rules' SYNs, flows living here
//! (a socket, a SYN-cookie handshake), SYNs whose MSS is not their first option, next hops that
//! are not resolved, not on the uplink or whose MTU is too small, and anything malformed.

use core::{mem, ptr};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibLookup},
    helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use redirector_common::{
    Addr, Counter, FlowKey, RuleValue, SERVICE_XDP, ServiceValue, as_v4,
    decide::{self, Step, migrated_step},
};

use crate::{
    addr::{mapped_v4, words},
    flow::{lookup_packet_v4, lookup_packet_v6},
    frozen,
    hdr::{self, AF_INET, AF_INET6, ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IP4_LEN, IP6_LEN, IPPROTO_TCP, Ipv4Hdr, Ipv6Hdr, TCP_CSUM_OFF, TCP_LEN, TcpHdr},
    packet::ptr_at,
    rules::{host_rule_v4, host_rule_v6, now_if_draining},
    services::{service_at_v4, service_at_v6},
    verdict::Error,
    zeroed::Room,
};

/// The packet goes on to the classifier (which decides and counts it).
pub struct Pass;

impl From<Error> for Pass {
    fn from(_: Error) -> Self {
        Pass
    }
}

/// A migrated client's TCP packet to a service the fast path serves, as the headers say.
struct Steered {
    service: ServiceValue,
    rule: RuleValue,
    flags: u8,
}

/// Forwards the packet to its target (`Ok`: the counter of the classifier's own decision, and
/// the packet leaves with `XDP_TX`), or leaves it to the classifier.
#[inline(always)]
pub fn fast_path(ctx: &XdpContext) -> Result<Counter, Pass> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    match u16::from_be_bytes(unsafe { (*eth).proto }) {
        ETH_P_IP => {
            let s = steered_v4(ctx)?;
            decide_and_forward::<false>(ctx, &s)
        }
        ETH_P_IPV6 => {
            let s = steered_v6(ctx)?;
            decide_and_forward::<true>(ctx, &s)
        }
        _ => Err(Pass),
    }
}

/// An IPv4 packet the fast path may decide: TCP without options or fragments, to a service
/// with [`SERVICE_XDP`], of a flow not frozen, from a migrated client.
#[inline(always)]
fn steered_v4(ctx: &XdpContext) -> Result<Steered, Pass> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    let tcp: *const TcpHdr = ptr_at(ctx, ETH_LEN + IP4_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, proto, frag, src, dst) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).frag, (*ip).src, (*ip).dst) };
    if vihl != 0x45 || proto != IPPROTO_TCP || hdr::is_fragment(frag) {
        return Err(Pass);
    }
    // SAFETY: as above.
    let (sport, dport, flags) = unsafe { ((*tcp).sport, (*tcp).dport, (*tcp).flags) };
    let service = service_at_v4(u32::from_ne_bytes(dst), dst, dport).ok_or(Pass)?;
    if service.flags & SERVICE_XDP == 0 {
        return Err(Pass);
    }
    if frozen::any() && frozen::holds(&FlowKey { client: mapped_v4(src), service: mapped_v4(dst), client_port: sport, service_port: dport }) {
        return Err(Pass);
    }
    let rule = host_rule_v4(src).ok_or(Pass)?;
    Ok(Steered { service, rule, flags })
}

/// [`steered_v4`] for IPv6: TCP right after the fixed header.
#[inline(always)]
fn steered_v6(ctx: &XdpContext) -> Result<Steered, Pass> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
    let tcp: *const TcpHdr = ptr_at(ctx, ETH_LEN + IP6_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (vtc, next) = unsafe { ((*ip).vtc, (*ip).next) };
    if vtc >> 4 != 6 || next != IPPROTO_TCP {
        return Err(Pass);
    }
    // SAFETY: as above.
    let (sport, dport, flags, src, dst) = unsafe { ((*tcp).sport, (*tcp).dport, (*tcp).flags, &(*ip).src, &(*ip).dst) };
    let service = service_at_v6(dst, dport).ok_or(Pass)?;
    if service.flags & SERVICE_XDP == 0 {
        return Err(Pass);
    }
    if frozen::any() && frozen::holds(&FlowKey { client: *src, service: *dst, client_port: sport, service_port: dport }) {
        return Err(Pass);
    }
    let rule = host_rule_v6(src).ok_or(Pass)?;
    Ok(Steered { service, rule, flags })
}

/// The classifier's decision for a migrated client's packet ([`migrated_step`], then the socket
/// lookup and [`decide::place`]); forwarded here when the classifier would forward it.
#[inline(always)]
fn decide_and_forward<const V6: bool>(ctx: &XdpContext, s: &Steered) -> Result<Counter, Pass> {
    let (counter, clamp) = match migrated_step(s.flags, &s.rule, now_if_draining(&s.rule)) {
        Step::ForwardNew => (Counter::ForwardedNew, s.service.mss_clamp),
        Step::CheckSocket => {
            let found = if V6 { lookup_packet_v6(ctx)? } else { lookup_packet_v4(ctx)? };
            (decide::fast_forward(decide::place(found, &s.rule)).ok_or(Pass)?, 0)
        }
        Step::Inert | Step::KeepDraining => return Err(Pass),
    };
    forward::<V6>(ctx, &s.service.tunnel_src, &s.rule.target, clamp)?;
    Ok(counter)
}

/// An MSS option to lower: where its value is in the packet, the value and the new one.
struct Mss {
    at: *mut [u8; 2],
    old: u16,
    new: u16,
}

/// The MSS option of a SYN to lower to `clamp`, when MSS is the first option (as every common
/// stack sends it): where its value is, and the old and new values; `Ok(None)`: nothing to
/// lower. Another layout is left to the classifier, which scans the options.
#[inline(always)]
fn mss_to_lower(ctx: &XdpContext, l4: usize, clamp: u16) -> Result<Option<Mss>, Pass> {
    let tcp: *const TcpHdr = ptr_at(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    if clamp == 0 || unsafe { (*tcp).doff_res } >> 4 <= 5 {
        return Ok(None);
    }
    let first: *const [u8; 4] = ptr_at(ctx, l4 + TCP_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let o = unsafe { *first };
    if o[0] != 2 || o[1] != 4 {
        return Err(Pass);
    }
    let old = u16::from_be_bytes([o[2], o[3]]);
    Ok(decide::clamped(old, clamp).map(|new| Mss { at: first.cast_mut().cast::<[u8; 2]>().wrapping_add(1), old, new }))
}

/// Encapsulates the packet (IP-in-IP, or IPv6-in-IPv6 when `V6`) from `src` to `dst`, with the
/// MSS of a SYN lowered to `clamp` (0: not a SYN), and turns it around out of the uplink
/// (`XDP_TX`) to the next hop `bpf_fib_lookup` names. A next hop that is not resolved yet, is
/// reached through another interface, or whose MTU is too small for the tunnelled packet
/// leaves the packet unchanged to the classifier, which resolves and sends it
/// (`bpf_redirect_neigh`). (Should making the room fail after that, the packet goes on with its
/// MSS already lowered, as the classifier would lower it.)
#[inline(always)]
fn forward<const V6: bool>(ctx: &XdpContext, src: &Addr, dst: &Addr, clamp: u16) -> Result<(), Pass> {
    let outer_len = if V6 { IP6_LEN } else { IP4_LEN };
    let first: [u8; 8] = {
        let ip: *const [u8; 8] = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *ip }
    };
    let inner_len = u32::try_from((ctx.data_end() - ctx.data()).saturating_sub(ETH_LEN)).map_err(|_| Pass)?;
    let l4 = ETH_LEN + if V6 { IP6_LEN } else { IP4_LEN };
    let mss = mss_to_lower(ctx, l4, clamp)?;
    // SAFETY: reading the context the kernel passed.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut room = Room::<FibLookup>::new();
    // SAFETY: an all-zero lookup is valid; the union fields written are those of the family.
    let fib = unsafe { room.zeroed() };
    fib.ifindex = ifindex;
    #[expect(clippy::cast_possible_truncation, reason = "headers of at most 60 bytes plus a packet that fits an interface")]
    let total = (inner_len + outer_len as u32) as u16;
    fib.__bindgen_anon_1.tot_len = total;
    if V6 {
        fib.family = AF_INET6 as u8;
        fib.__bindgen_anon_3.ipv6_src = words(src);
        fib.__bindgen_anon_4.ipv6_dst = words(dst);
    } else {
        let (Some(src4), Some(dst4)) = (as_v4(src), as_v4(dst)) else { return Err(Pass) };
        fib.family = AF_INET as u8;
        fib.__bindgen_anon_2.tos = first[1];
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src4);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst4);
    }
    // SAFETY: a valid lookup structure of the size given, on our context.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), ptr::from_mut(fib), mem::size_of::<FibLookup>() as i32, 0) };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || fib.ifindex != ifindex {
        return Err(Pass);
    }
    if let Some(Mss { at, old, new }) = mss {
        let csum: *const [u8; 2] = ptr_at(ctx, l4 + TCP_CSUM_OFF)?;
        // SAFETY: both bounds checked by ptr_at; XDP may write its packet.
        unsafe {
            ptr::write_unaligned(at, new.to_be_bytes());
            let sum = decide::csum_replace16(u16::from_be_bytes(*csum), old, new);
            ptr::write_unaligned(csum.cast_mut(), sum.to_be_bytes());
        }
    }
    // SAFETY: a plain helper call on our context; the room comes before the packet.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(Pass);
    }
    let (Ok(eth), Ok(outer)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<[u8; IP6_LEN]>(ctx, ETH_LEN)) else {
        // Cannot happen (the room was made): give it back and let the classifier decide.
        // SAFETY: as above.
        unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) };
        return Err(Pass);
    };
    let proto = if V6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be_bytes();
    // SAFETY: bounds checked by ptr_at after the room was made (an IPv6 header's room covers an
    // IPv4 one: the inner packet follows).
    unsafe {
        ptr::write_unaligned(eth.cast_mut(), EthHdr { dst: fib.dmac, src: fib.smac, proto });
        if V6 {
            ptr::write_unaligned(outer.cast_mut(), decide::outer_v6([first[0], first[1], first[2], first[3]], inner_len, src, dst));
        } else if let (Some(src4), Some(dst4)) = (as_v4(src), as_v4(dst)) {
            ptr::write_unaligned(outer.cast_mut().cast::<[u8; IP4_LEN]>(), decide::outer_v4(first, inner_len, src4, dst4));
        }
    }
    Ok(())
}
