//! Encapsulation on the origin: a steered packet goes to its target through IP-in-IP or
//! IPv6-in-IPv6.

use core::ptr;

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::generated::{bpf_redirect_neigh, bpf_skb_change_head},
};
use redirector_common::{Addr, Counter, as_v4, decide};

use crate::{
    hdr::{ETH_LEN, IP4_LEN, IP6_LEN},
    packet::{ptr_at, subprogram_ctx},
    verdict::{Error, TC_ACT_REDIRECT, Verdict},
};

/// Encapsulates the packet (IP-in-IP, or IPv6-in-IPv6 when `V6`) from `src` to `dst` and sends
/// it out of the interface it arrived on, resolving the next hop's MAC address.
///
/// A GSO packet (large, segmented later) gets its room with `bpf_skb_adjust_room` and the
/// encapsulation flags, so that segmentation knows the inner headers. Any other packet gets it
/// with the cheaper `bpf_skb_change_head`, which is all that packet needs: the room is zeroed
/// and comes first, so its first 14 bytes stand for the Ethernet header (the outer IP header
/// follows them, over the old one), and the redirect only checks that this header's
/// destination is not multicast (all zeros is not) before it strips it and takes the outer IP
/// header for the network header. Copying the old Ethernet header in front cost 56
/// instructions a packet for nothing.
#[inline(never)]
pub fn forward<const V6: bool>(skb: *mut __sk_buff, src: &Addr, dst: &Addr, counter: Counter) -> Result<Verdict, Error> {
    let ctx = &subprogram_ctx(skb);
    let outer_len = if V6 { IP6_LEN } else { IP4_LEN };
    // Everything the new header needs, read before the packet changes.
    let ip: *const [u8; 8] = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let first = unsafe { *ip };
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
    }
    if V6 {
        let first4 = [first[0], first[1], first[2], first[3]];
        let at: *const [u8; IP6_LEN] = ptr_at(ctx, ETH_LEN).map_err(|_| Error::ForwardLost)?;
        // SAFETY: bounds checked by ptr_at after the room was made.
        unsafe { ptr::write_unaligned(at.cast_mut(), decide::outer_v6(first4, inner_len, src, dst)) };
    } else {
        let (Some(src4), Some(dst4)) = (as_v4(src), as_v4(dst)) else {
            return Err(Error::ForwardLost);
        };
        let at: *const [u8; IP4_LEN] = ptr_at(ctx, ETH_LEN).map_err(|_| Error::ForwardLost)?;
        // SAFETY: bounds checked by ptr_at after the room was made.
        unsafe { ptr::write_unaligned(at.cast_mut(), decide::outer_v4(first, inner_len, src4, dst4)) };
    }
    // SAFETY: plain helper call; ifindex is the interface the packet arrived on.
    let rc = unsafe { bpf_redirect_neigh((*skb).ifindex, ptr::null_mut(), 0, 0) };
    if rc as i32 == TC_ACT_REDIRECT { Ok(Verdict { action: TC_ACT_REDIRECT, counter }) } else { Err(Error::ForwardLost) }
}
