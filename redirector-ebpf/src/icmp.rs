//! ICMP relay on the origin: errors about flows that live on a target go there.

use core::mem;

use aya_ebpf::bindings::{__sk_buff, bpf_sock_tuple};
use redirector_common::{
    Counter, ServiceKey,
    decide::{Step, TCP_ACK, icmp4_is_error, icmp6_is_error, migrated_step},
};

use crate::{
    addr::mapped_v4,
    flow::{TUPLE4_LEN, TUPLE6_LEN, lookup_flow, tuple_v4, tuple_v6},
    hdr::{ETH_LEN, IP4_LEN, IP6_LEN, IPPROTO_TCP, IcmpHdr, Ipv4Hdr, Ipv6Hdr},
    packet::{ptr_at, subprogram_ctx},
    rules::{host_rule_v4, host_rule_v6, now_if_draining},
    services::service,
    steer::keep_or_forward,
    verdict::{Error, Verdict, pass},
};

/// ICMP (ICMPv6 when `V6`) error about a flow of a steered service: relayed to the target the
/// flow lives on (by the quoted flow: only 8 bytes of its TCP header are guaranteed).
/// Addresses are read in place in the packet: copies would not fit the stack.
#[inline(never)]
pub fn icmp<const V6: bool>(skb: *mut __sk_buff) -> Result<Verdict, Error> {
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
    let key: ServiceKey;
    let mut tuple: bpf_sock_tuple;
    let rule = if V6 {
        let q: *const Ipv6Hdr = ptr_at(ctx, inner)?;
        // RFC 792/4443: an error quotes at least 8 bytes of the TCP header.
        let p: *const [u8; 8] = ptr_at(ctx, inner + IP6_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            if (*q).next != IPPROTO_TCP {
                return Ok(pass(Counter::Passed));
            }
            key = ServiceKey { addr: (*q).src, port: [(*p)[0], (*p)[1]], _pad: [0; 2] };
            tuple = tuple_v6(&(*q).dst, &(*q).src, [(*p)[2], (*p)[3]], [(*p)[0], (*p)[1]]);
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
            key = ServiceKey { addr: mapped_v4((*q).src), port: [(*p)[0], (*p)[1]], _pad: [0; 2] };
            tuple = tuple_v4((*q).dst, (*q).src, [(*p)[2], (*p)[3]], [(*p)[0], (*p)[1]]);
            host_rule_v4((*q).dst)
        }
    };
    let Some(service) = service(key) else {
        return Ok(pass(Counter::Passed));
    };
    let Some(rule) = rule else {
        return Ok(pass(Counter::PassedNotMigrated));
    };
    if migrated_step(TCP_ACK, &rule, now_if_draining(&rule)) == Step::Inert {
        return Ok(pass(Counter::PassedNotMigrated));
    }
    let found = lookup_flow(ctx, &mut tuple, if V6 { TUPLE6_LEN } else { TUPLE4_LEN }, None);
    keep_or_forward::<V6>(ctx, found, &service, &rule, Counter::IcmpRelayed, Counter::IcmpRelayed)
}
