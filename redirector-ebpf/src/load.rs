//! Load counting on the application's cgroup (`sock_ops`): established connections per
//! client address and in total, and the kernel's report when the total crosses a watermark.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr,
};

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LruHashMap, RingBuf},
    programs::SockOpsContext,
};
use redirector_common::{Addr, LoadCtl, LoadEvent, MAX_CLIENTS, decide::TCP_ESTABLISHED, v4_mapped};

use crate::{
    addr::from_words,
    hdr::{AF_INET, AF_INET6},
};

/// Established connections per client address, for choosing whom to move. Least recently
/// changed entries make room for new clients when the map is full, so a count can be low;
/// `LOAD_TOTAL` is always exact.
#[map]
static LOAD: LruHashMap<Addr, i64> = LruHashMap::pinned(MAX_CLIENTS, 0);
/// `[0]`: established connections of the application(s), in total.
#[map]
static LOAD_TOTAL: Array<i64> = Array::pinned(1, 0);
/// `[0]`: the watermark whose crossing is reported on `LOAD_EVENTS`.
#[map]
static LOAD_CTL: Array<LoadCtl> = Array::pinned(1, 0);
/// One [`LoadEvent`] when the total passes the armed watermark.
#[map]
static LOAD_EVENTS: RingBuf = RingBuf::pinned(4096, 0);

const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 4;

/// Counts a connection up when it is accepted, down when it leaves ESTABLISHED.
#[inline(always)]
pub fn on_sock_op(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            add_load(ctx, 1);
            // Ask for state changes of this socket, to count it down.
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(0) == TCP_ESTABLISHED && ctx.arg(1) != TCP_ESTABLISHED => {
            add_load(ctx, -1);
        }
        _ => {}
    }
}

/// Adds `delta` to `*p` atomically. The result is not used, so this is the BPF atomic add
/// every kernel and CPU version has (no fetch).
///
/// # Safety
/// `p` points to a valid, 8-byte aligned map value.
#[inline(always)]
unsafe fn atomic_add(p: *mut i64, delta: i64) {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(p, delta) };
}

#[inline(always)]
fn add_load(ctx: &SockOpsContext, delta: i64) {
    let addr = match ctx.family() {
        AF_INET => v4_mapped(ctx.remote_ip4().to_ne_bytes()),
        AF_INET6 => from_words(ctx.remote_ip6()),
        _ => return,
    };
    if let Some(v) = LOAD.get_ptr_mut(addr) {
        // SAFETY: a valid, aligned map value shared by all CPUs: changed atomically.
        unsafe { atomic_add(v, delta) };
    } else if LOAD.insert(addr, delta, 1 /* BPF_NOEXIST */).is_err() {
        // Another CPU created the entry meanwhile.
        if let Some(v) = LOAD.get_ptr_mut(addr) {
            // SAFETY: as above.
            unsafe { atomic_add(v, delta) };
        }
    }
    let Some(total) = LOAD_TOTAL.get_ptr_mut(0) else { return };
    // SAFETY: as above.
    unsafe { atomic_add(total, delta) };
    if delta <= 0 {
        return;
    }
    // Read back: it may already include other CPUs' changes, which only moves the report by a
    // connection or two.
    // SAFETY: as above.
    let now = unsafe { ptr::read_volatile(total) };
    let Some(ctl) = LOAD_CTL.get_ptr_mut(0) else { return };
    // SAFETY: a valid map value; a racing CPU may report the same crossing once more, which
    // user space tolerates.
    unsafe {
        if (*ctl).armed != 0 && now > 0 && now.cast_unsigned() > (*ctl).high {
            (*ctl).armed = 0;
            let _ = LOAD_EVENTS.output::<LoadEvent>(LoadEvent { at_ns: bpf_ktime_get_ns(), total: now.cast_unsigned() }, 0);
        }
    }
}
