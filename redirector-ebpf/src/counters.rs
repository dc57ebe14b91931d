//! The per-CPU decision counters user space sums for `redirector stats`.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use redirector_common::Counter;

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::IN_COUNTERS, 0);
/// Counters added after `COUNTERS`' size was fixed (`Counter::extra_index`).
#[map]
static COUNTERS_EXTRA: PerCpuArray<u64> = PerCpuArray::pinned(Counter::EXTRA_SLOTS, 0);

/// Counts a verdict's counter in `COUNTERS`. A counter of `COUNTERS_EXTRA` has no entry there
/// (an array lookup past the end finds nothing): it is counted where it is decided, with
/// [`count_extra`], so that counting the common packet stays one array lookup.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Counts `counter` if it is one of `COUNTERS_EXTRA` (a constant at every call site, so the
/// test folds away).
#[inline(always)]
pub fn count_extra(counter: Counter) {
    if let Some(i) = counter.extra_index()
        && let Some(c) = COUNTERS_EXTRA.get_ptr_mut(i)
    {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
