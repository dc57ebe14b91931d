//! The kernel's own word on rare events (a tunnelled packet dropped, a connection to an adopted
//! service refused, a fallback taken), as aya-log lines the agent writes into its log.
//!
//! Never on the common path: the entry points call in here only from their error paths, and each
//! kind is reported at most once a second per CPU (a flood of spoofed tunnel packets costs a
//! map lookup per packet, not a log line); the counters of `redirector stats` hold the totals.

use aya_ebpf::{bindings::__sk_buff, helpers::generated::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};
use aya_log_ebpf::warn;
use redirector_common::{Addr, Counter, as_v4};

use crate::{
    hdr::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, Ipv4Hdr, Ipv6Hdr},
    packet::{ptr_at, subprogram_ctx},
};

/// At most one line per kind and CPU in this many nanoseconds.
const EVERY_NS: u64 = 1_000_000_000;

/// When this CPU last reported each kind (indexed by its counter) and how many it held back
/// since. Not pinned: a new program starts reporting afresh.
#[map]
static REPORTED: PerCpuArray<Reported> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Reported {
    last_ns: u64,
    held: u64,
}

/// `Some(held back since the last line)` when a line about `counter` is due on this CPU.
#[inline(always)]
fn due(counter: Counter) -> Option<u64> {
    let r = REPORTED.get_ptr_mut(counter as u32)?;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    unsafe {
        if (*r).last_ns != 0 && now.wrapping_sub((*r).last_ns) < EVERY_NS {
            (*r).held += 1;
            return None;
        }
        let held = (*r).held;
        (*r).last_ns = now;
        (*r).held = 0;
        Some(held)
    }
}

/// Reports a packet the ingress classifier dropped (with its sender's address) or could not
/// forward; `counter` is its verdict's.
#[inline(never)]
pub fn ingress(skb: *mut __sk_buff, counter: Counter) {
    let ctx = &subprogram_ctx(skb);
    let Some(held) = due(counter) else { return };
    if counter == Counter::ErrorForward {
        // The packet may carry the tunnel's header already: its source says nothing.
        warn!(ctx, "could not tunnel a packet of a migrated client to its target (the packet was kept here or dropped) ({} more on this CPU since the last line)", held);
        return;
    }
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else { return };
    // SAFETY: bounds checked by ptr_at.
    let src: Addr = match u16::from_be_bytes(unsafe { (*eth).proto }) {
        ETH_P_IP => match ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) {
            // SAFETY: bounds checked by ptr_at.
            Ok(ip) => redirector_common::v4_mapped(unsafe { (*ip).src }),
            Err(_) => return,
        },
        ETH_P_IPV6 => match ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) {
            // SAFETY: bounds checked by ptr_at.
            Ok(ip) => unsafe { (*ip).src },
            Err(_) => return,
        },
        _ => return,
    };
    match (counter, as_v4(&src)) {
        (Counter::DroppedBad, Some(v4)) => {
            warn!(ctx, "dropped a tunnelled packet from {:i}: not from a configured sibling, or malformed ({} more on this CPU since the last line)", v4, held);
        }
        (Counter::DroppedBad, None) => {
            warn!(ctx, "dropped a tunnelled packet from {:i}: not from a configured sibling, or malformed ({} more on this CPU since the last line)", src, held);
        }
        (Counter::DroppedNotAdopted, Some(v4)) => {
            warn!(ctx, "dropped a tunnelled packet from sibling {:i}: not for a service adopted here ({} more on this CPU since the last line)", v4, held);
        }
        (Counter::DroppedNotAdopted, None) => {
            warn!(ctx, "dropped a tunnelled packet from sibling {:i}: not for a service adopted here ({} more on this CPU since the last line)", src, held);
        }
        (Counter::DroppedSpoofed, Some(v4)) => {
            warn!(
                ctx,
                "dropped a tunnelled packet from sibling {:i}: its inner source is this node's, a sibling's or loopback ({} more on this CPU since the last line)", v4, held
            );
        }
        (Counter::DroppedSpoofed, None) => {
            warn!(
                ctx,
                "dropped a tunnelled packet from sibling {:i}: its inner source is this node's, a sibling's or loopback ({} more on this CPU since the last line)", src, held
            );
        }
        _ => {}
    }
}

/// Reports a connection to adopted service `addr`:`port` refused for want of a listener.
#[inline(never)]
pub fn no_listener(addr: &Addr, port: u16) {
    let Some(held) = due(Counter::SkNoListener) else { return };
    match as_v4(addr) {
        Some(v4) => {
            warn!(&(), "refused a connection to adopted service {:i}:{}: no listener registered for it ({} more on this CPU since the last line)", v4, port, held);
        }
        None => {
            warn!(&(), "refused a connection to adopted service [{:i}]:{}: no listener registered for it ({} more on this CPU since the last line)", *addr, port, held);
        }
    }
}

/// Reports a SYN or SYN-ACK whose MSS needed lowering for the tunnel but could not be changed.
#[inline(never)]
pub fn clamp_failed() {
    let Some(held) = due(Counter::ErrorClamp) else { return };
    warn!(&(), "could not lower the MSS of a SYN for the tunnel: it went on as it was ({} more on this CPU since the last line)", held);
}
