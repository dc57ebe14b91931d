//! Encapsulation on the origin: a steered packet goes to its target through IP-in-IP or
//! IPv6-in-IPv6.

use core::ptr;

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::generated::{bpf_redirect_neigh, bpf_skb_change_head},
};
use redirector_common::{Addr, Counter, as_v4, decide};

use crate::{
    hdr::{ETH_LEN, EthHdr, IP4_LEN, IP6_LEN, IPPROTO_IPIP, IPPROTO_IPV6},
    packet::{ptr_at, subprogram_ctx},
    verdict::{Error, TC_ACT_REDIRECT, Verdict},
};

/// Encapsulates the packet (IP-in-IP, or IPv6-in-IPv6 when `V6`) from `src` to `dst` and sends
/// it out of the interface it arrived on, resolving the next hop's MAC address.
///
/// A GSO packet (large, segmented later) gets its room with `bpf_skb_adjust_room` and the
/// encapsulation flags, so that segmentation knows the inner headers. Any other packet gets it
/// with the cheaper `bpf_skb_change_head`: the redirect strips the Ethernet header and takes
/// the outer IP header for the network header, which is all that packet needs.
#[inline(never)]
pub fn forward<const V6: bool>(skb: *mut __sk_buff, src: &Addr, dst: &Addr, counter: Counter) -> Result<Verdict, Error> {
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
