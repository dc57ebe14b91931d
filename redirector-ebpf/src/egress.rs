//! The egress clamp: SYN-ACKs of adopted services (on a target), and of an origin's services
//! whose connections may move live, announce an MSS that fits the tunnel.

use aya_ebpf::programs::TcContext;
use redirector_common::{
    MUTED_MARK, SERVICE_LIVE_MOVES, ServiceKey,
    decide::{TCP_ACK, TCP_SYN},
    v4_mapped,
};

use crate::{
    adopted::mss_clamp,
    clamp::clamp_syn,
    frozen,
    hdr::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IP4_LEN, IP6_LEN, IPPROTO_TCP, Ipv4Hdr, Ipv6Hdr, TcpHdr},
    packet::ptr_at,
    services::service,
    verdict::Error,
};

/// Whether the packet was sent by a dumped socket ([`MUTED_MARK`]) on a frozen flow: its
/// connection moves, and what the old socket sends on its own must not reach the peer.
pub fn muted(ctx: &TcContext) -> bool {
    // SAFETY: the context's socket buffer, valid for the program's run.
    if unsafe { (*ctx.skb.skb).mark } != MUTED_MARK || !frozen::any() {
        return false;
    }
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else { return false };
    // SAFETY: bounds checked by ptr_at.
    match u16::from_be_bytes(unsafe { (*eth).proto }) {
        ETH_P_IP => frozen::reply_v4_at(ctx.skb.skb, ETH_LEN),
        ETH_P_IPV6 => frozen::reply_v6_at(ctx.skb.skb, ETH_LEN),
        _ => false,
    }
}

/// Whether the packet is a SYN-ACK whose MSS was clamped (an adopted service's, or a live-moving one's).
pub fn try_egress(ctx: &TcContext) -> Result<bool, Error> {
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
    let key = ServiceKey { addr: src, port: t.sport, _pad: [0; 2] };
    // An adopted service's, or one of this origin's own whose connections may move live.
    let Some(clamp) = mss_clamp(key).or_else(|| service(key).filter(|s| s.flags & SERVICE_LIVE_MOVES != 0).map(|s| s.mss_clamp)) else {
        return Ok(false);
    };
    Ok(clamp_syn(ctx, l4, clamp))
}
