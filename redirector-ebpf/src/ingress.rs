//! The ingress classifier's first look at a packet: which concern it is (steering, a tunnel,
//! an ICMP error, a probe's answer) or that it passes.

use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use redirector_common::{Counter, decide::is_answer};

use crate::{
    counters::count_extra,
    decap::decap,
    frozen,
    hdr::{
        self, ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IP4_LEN, IP6_LEN, IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_ESP, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ICMP, IPPROTO_ICMPV6,
        IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_ROUTING, IPPROTO_TCP, Ipv4Hdr, Ipv6Hdr, TcpHdr,
    },
    icmp::icmp,
    packet::{ptr_at, subprogram_ctx},
    probe::probe_answer,
    rules::{host_rule_v4, host_rule_v6},
    services::{service_at_v4, service_at_v6},
    steer::steer,
    verdict::{Error, Verdict, drop, pass},
};

/// Which concern the packet is, by its EtherType first.
pub fn try_ingress(ctx: &TcContext) -> Result<Verdict, Error> {
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
        // A tunnel of the other family is never one of ours.
        IPPROTO_IPV6 => return Err(Error::BadTunnel),
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
    // A flow moving live (its client may not be steered yet: the rules come at the end of
    // the hand-over, the freeze before its start).
    if frozen::any() && frozen::frozen_v4(ctx.skb.skb) {
        // Past `COUNTERS`: counted here (see `counters::count_extra`).
        count_extra(Counter::DroppedFrozen);
        return Ok(drop(Counter::DroppedFrozen));
    }
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
        IPPROTO_IPIP => return Err(Error::BadTunnel),
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
    // A flow moving live (as for IPv4).
    if frozen::any() && frozen::frozen_v6(ctx.skb.skb) {
        // Past `COUNTERS`: counted here (see `counters::count_extra`).
        count_extra(Counter::DroppedFrozen);
        return Ok(drop(Counter::DroppedFrozen));
    }
    // SAFETY: as above.
    let Some(rule) = host_rule_v6(unsafe { &(*ip).src }) else {
        return Ok(pass(Counter::PassedNotMigrated));
    };
    steer::<true>(ctx.skb.skb, &service, &rule)
}
