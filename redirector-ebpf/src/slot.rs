//! Reading the direct-mapped slot tables (`PORT_SLOTS_*`, `HOSTS_*`) that user space changes
//! while the classifier reads them.

use core::ptr;

use redirector_common::Addr;

/// A slot's kind, read first. User space writes a slot's data first and its kind last; the
/// data is read only in the branch the kind selects, through raw pointers (which the compiler
/// cannot load from speculatively), so data read after a kind that says "use me" is complete.
#[inline(always)]
pub fn kind_of(kind: *const u32) -> u32 {
    // SAFETY: callers pass pointers into map values they hold.
    unsafe { ptr::read_volatile(kind) }
}

#[inline(always)]
pub fn read<T: Copy>(p: *const T) -> T {
    // SAFETY: callers pass pointers into map values they hold.
    unsafe { ptr::read(p) }
}

/// Whether the address at `stored` (in a map value, read in place) is `w` (see
/// [`crate::addr::words`]).
#[inline(always)]
pub fn addr_is(stored: *const Addr, w: &[u32; 4]) -> bool {
    // Slot data starts 8 bytes into an 8-byte aligned map value.
    let p = stored.cast::<u32>();
    read(p) == w[0] && read(p.wrapping_add(1)) == w[1] && read(p.wrapping_add(2)) == w[2] && read(p.wrapping_add(3)) == w[3]
}
