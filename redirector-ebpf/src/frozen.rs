//! Flows frozen while their connections move to another host: their packets are dropped until
//! the move is decided, because a socket being dumped still acknowledges what arrives, and what
//! it acknowledged would be lost with it. The origin freezes them as they arrive from clients
//! (and keeps copies, which it replays); a volunteer giving connections back freezes them as
//! they come out of the tunnel too, for a packet the origin forwarded just before its own
//! freeze may arrive after the origin said it froze them. A hand-over freezes its clients'
//! connections before its rules exist (the rules are its commit point, at its end), so every
//! packet to a service is looked at: one array read while no flow is frozen, a hash lookup
//! while any is.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap},
};
use redirector_common::{FlowKey, MAX_FROZEN};

use crate::{
    addr::mapped_v4,
    hdr::{ETH_LEN, IP4_LEN, IP6_LEN, IPPROTO_TCP, Ipv4Hdr, Ipv6Hdr, TcpHdr},
    packet::{ptr_at, subprogram_ctx},
};

/// Frozen flows, with the `CLOCK_MONOTONIC` time each freeze ends by itself.
#[map]
static FROZEN: HashMap<FlowKey, u64> = HashMap::pinned(MAX_FROZEN, 0);
/// `[0]`: whether any flow is frozen (user space sets it with the first and clears it with
/// the last): otherwise nothing is looked up.
#[map]
static FROZEN_ANY: Array<u32> = Array::pinned(1, 0);

/// Whether any flow is frozen.
#[inline(always)]
pub fn any() -> bool {
    FROZEN_ANY.get(0).is_some_and(|n| *n != 0)
}

/// Whether flow `key` is frozen (and its freeze has not ended by itself).
#[inline(always)]
pub fn holds(key: &FlowKey) -> bool {
    // SAFETY: map values are plain data.
    match unsafe { FROZEN.get(key) } {
        Some(until) => {
            // SAFETY: a helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            now < *until
        }
        None => false,
    }
}

/// Whether this IPv4 TCP packet (headers checked by the caller) belongs to a frozen flow.
#[inline(never)]
pub fn frozen_v4(skb: *mut __sk_buff) -> bool {
    frozen_v4_at(skb, ETH_LEN)
}

/// [`frozen_v4`] for IPv6.
#[inline(never)]
pub fn frozen_v6(skb: *mut __sk_buff) -> bool {
    frozen_v6_at(skb, ETH_LEN)
}

/// Whether the IPv4 TCP packet inside a tunnelled one (its IP header at `off`, checked by the
/// caller) belongs to a frozen flow.
#[inline(never)]
pub fn frozen_v4_at(skb: *mut __sk_buff, off: usize) -> bool {
    let ctx = &subprogram_ctx(skb);
    let (Ok(ip), Ok(tcp)) = (ptr_at::<Ipv4Hdr>(ctx, off), ptr_at::<TcpHdr>(ctx, off + IP4_LEN)) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let key = unsafe { FlowKey { client: mapped_v4((*ip).src), service: mapped_v4((*ip).dst), client_port: (*tcp).sport, service_port: (*tcp).dport } };
    holds(&key)
}

/// Whether the IPv4 TCP packet at `off`, sent by the service (so its key is reversed: the
/// destination is the client), belongs to a frozen flow. Checks its headers itself.
#[inline(never)]
pub fn reply_v4_at(skb: *mut __sk_buff, off: usize) -> bool {
    let ctx = &subprogram_ctx(skb);
    let (Ok(ip), Ok(tcp)) = (ptr_at::<Ipv4Hdr>(ctx, off), ptr_at::<TcpHdr>(ctx, off + IP4_LEN)) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let (ip, tcp) = unsafe { (*ip, *tcp) };
    if ip.proto != IPPROTO_TCP || ip.vihl != 0x45 {
        return false;
    }
    holds(&FlowKey { client: mapped_v4(ip.dst), service: mapped_v4(ip.src), client_port: tcp.dport, service_port: tcp.sport })
}

/// [`reply_v4_at`] for IPv6 (no extension headers).
#[inline(never)]
pub fn reply_v6_at(skb: *mut __sk_buff, off: usize) -> bool {
    let ctx = &subprogram_ctx(skb);
    let (Ok(ip), Ok(tcp)) = (ptr_at::<Ipv6Hdr>(ctx, off), ptr_at::<TcpHdr>(ctx, off + IP6_LEN)) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let (ip, tcp) = unsafe { (*ip, *tcp) };
    if ip.next != IPPROTO_TCP {
        return false;
    }
    holds(&FlowKey { client: ip.dst, service: ip.src, client_port: tcp.dport, service_port: tcp.sport })
}

/// [`frozen_v4_at`] for IPv6.
#[inline(never)]
pub fn frozen_v6_at(skb: *mut __sk_buff, off: usize) -> bool {
    let ctx = &subprogram_ctx(skb);
    let (Ok(ip), Ok(tcp)) = (ptr_at::<Ipv6Hdr>(ctx, off), ptr_at::<TcpHdr>(ctx, off + IP6_LEN)) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let key = unsafe { FlowKey { client: (*ip).src, service: (*ip).dst, client_port: (*tcp).sport, service_port: (*tcp).dport } };
    holds(&key)
}
