//! MSS clamping of SYNs and SYN-ACKs, so that tunnelled segments fit the uplink.

use aya_ebpf::{bindings::__sk_buff, helpers::generated::bpf_skb_load_bytes, programs::TcContext};
use redirector_common::{Counter, decide};

use crate::{
    counters::count,
    hdr::{TCP_CSUM_OFF, TCP_LEN, TcpHdr},
    packet::{ptr_at, subprogram_ctx},
    report,
    zeroed::Room,
};

/// Lowers the MSS option of the SYN (or SYN-ACK) at `l4` to `clamp` so tunnelled packets fit
/// the uplink; counts a clamp that was needed but failed. Nearly every stack sends MSS as the
/// first option, which is read and written in place here; other layouts are scanned by a
/// subprogram.
#[inline(always)]
pub fn clamp_syn(ctx: &TcContext, l4: usize, clamp: u16) -> bool {
    let r = match clamp_first(ctx, l4, clamp) {
        Some(r) => r,
        None => clamp_scan(ctx.skb.skb, l4, clamp),
    };
    r.unwrap_or_else(|()| {
        count(Counter::ErrorClamp);
        report::clamp_failed();
        false
    })
}

/// The clamp when MSS is the first option: `None` when it is not.
#[inline(always)]
fn clamp_first(ctx: &TcContext, l4: usize, clamp: u16) -> Option<Result<bool, ()>> {
    let tcp: *const TcpHdr = ptr_at(ctx, l4).ok()?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*tcp).doff_res } >> 4 <= 5 || clamp == 0 {
        return Some(Ok(false));
    }
    let first: *const [u8; 4] = ptr_at(ctx, l4 + TCP_LEN).ok()?;
    // SAFETY: bounds checked by ptr_at.
    let o = unsafe { *first };
    if o[0] != 2 || o[1] != 4 {
        return None;
    }
    let old = u16::from_be_bytes([o[2], o[3]]);
    let Some(new) = decide::clamped(old, clamp) else { return Some(Ok(false)) };
    // SAFETY: bounds checked by ptr_at; TC programs may write packet data (the verifier
    // unclones a shared skb first).
    unsafe { *first.cast_mut().cast::<[u8; 2]>().add(1) = new.to_be_bytes() };
    Some(replace_csum(ctx, l4, TCP_LEN + 2, old, new))
}

/// The clamp for any option layout: `Ok(true)`: clamped; `Ok(false)`: nothing to do; `Err`:
/// the MSS was too large and could not be changed.
#[inline(never)]
fn clamp_scan(skb: *mut __sk_buff, l4: usize, clamp: u16) -> Result<bool, ()> {
    let ctx = &subprogram_ctx(skb);
    let tcp: *const TcpHdr = ptr_at(ctx, l4).map_err(|_| ())?;
    // SAFETY: bounds checked by ptr_at.
    let doff = usize::from(unsafe { (*tcp).doff_res } >> 4) * 4;
    if doff <= TCP_LEN || clamp == 0 {
        return Ok(false);
    }
    let opt_off = l4 + TCP_LEN;
    let opt_len = doff - TCP_LEN;
    let mut room = Room::<[u8; decide::OPTS_BUF]>::new();
    // SAFETY: any bytes are a valid byte array.
    let opts = unsafe { room.zeroed() };
    #[expect(clippy::cast_possible_truncation, reason = "at most 40")]
    let n = opt_len as u32;
    if n == 0 || n > 40 {
        return Ok(false);
    }
    // SAFETY: opts has 64 bytes and 1 <= n <= 40.
    let rc = unsafe { bpf_skb_load_bytes(skb.cast(), opt_off as u32, opts.as_mut_ptr().cast(), n) };
    if rc != 0 {
        return Ok(false);
    }
    let Some((i, old)) = decide::find_mss(opts, opt_len) else { return Ok(false) };
    let Some(new) = decide::clamped(old, clamp) else { return Ok(false) };
    ctx.store(opt_off + i + 2, &new.to_be_bytes(), 0).map_err(|_| ())?;
    replace_csum(ctx, l4, TCP_LEN + i + 2, old, new)
}

/// Updates the TCP checksum for the MSS at byte `at` of the segment changed from `old` to `new`.
#[inline(always)]
fn replace_csum(ctx: &TcContext, l4: usize, at: usize, old: u16, new: u16) -> Result<bool, ()> {
    let (from, to) = (decide::csum_word(at, old), decide::csum_word(at, new));
    ctx.l4_csum_replace(l4 + TCP_CSUM_OFF, u64::from(from), u64::from(to), 2).map(|()| true).map_err(|_| ())
}
