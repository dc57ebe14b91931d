//! Readiness probes on the origin: a target's answer to a probe user space sent through the
//! tunnel is recorded for user space and goes no further.

use aya_ebpf::{bindings::__sk_buff, helpers::generated::bpf_ktime_get_ns, macros::map, maps::HashMap};
use redirector_common::{Counter, MAX_PROBES, ProbeValue, v4_mapped};

use crate::{
    addr::words,
    hdr::{ETH_LEN, IP4_LEN, IP6_LEN, Ipv4Hdr, Ipv6Hdr, TcpHdr},
    packet::{ptr_at, subprogram_ctx},
    services::{service_at_v4, service_at_v6},
    slot::addr_is,
    verdict::{Verdict, drop, pass},
};

/// Outstanding probes by their source port; user space creates each entry before it sends.
#[map]
static PROBES: HashMap<u32, ProbeValue> = HashMap::pinned(MAX_PROBES, 0);

/// A SYN-ACK or RST (not for a steered service) from one of our service addresses to that
/// service's tunnel source, acknowledging an outstanding probe's sequence number, is a
/// target's answer to that readiness probe: recorded for user space and dropped. Anything else
/// passes (an answer with another acknowledgement number is not the target's).
#[inline(never)]
pub fn probe_answer<const V6: bool>(skb: *mut __sk_buff) -> Verdict {
    let ctx = &subprogram_ctx(skb);
    let l4 = if V6 { ETH_LEN + IP6_LEN } else { ETH_LEN + IP4_LEN };
    let Ok(tcp) = ptr_at::<TcpHdr>(ctx, l4) else { return pass(Counter::Passed) };
    // SAFETY: bounds checked by ptr_at.
    let (sport, dport, flags, ack) = unsafe { ((*tcp).sport, (*tcp).dport, (*tcp).flags, (*tcp).ack) };
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
        if (*probe).ack != u32::from_be_bytes(ack) {
            return pass(Counter::Passed);
        }
        (*probe).tcp_flags = flags;
        (*probe).seen_ns = bpf_ktime_get_ns();
    }
    drop(Counter::ProbeAnswer)
}
