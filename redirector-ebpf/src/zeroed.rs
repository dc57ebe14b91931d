//! All-zero structures that a helper reads whole, written a word at a time in place.
//!
//! `mem::zeroed` (and `[0; N]`) compile to a call of `memset`, which on BPF is a loop storing
//! one byte per turn: 64 turns for a FIB lookup's parameters, on every packet that needs one.

use core::{mem::MaybeUninit, ptr};

/// Room for a `T`, aligned for 8-byte stores (the verifier refuses misaligned stack accesses).
#[repr(C, align(8))]
pub struct Room<T>(MaybeUninit<T>);

impl<T> Room<T> {
    #[inline(always)]
    pub const fn new() -> Self {
        Self(MaybeUninit::uninit())
    }

    /// Fills the room with zeros, one store per 8 bytes, and returns the `T` it now holds. The
    /// stores are volatile so that the compiler cannot merge them back into a `memset`.
    ///
    /// # Safety
    /// All-zero bytes must be a valid `T`, as for `mem::zeroed`.
    #[inline(always)]
    pub unsafe fn zeroed(&mut self) -> &mut T {
        const { assert!(size_of::<T>().is_multiple_of(8), "whole words only") };
        let words = self.0.as_mut_ptr().cast::<u64>();
        for i in 0..size_of::<T>() / 8 {
            // SAFETY: within the room, which is aligned for u64.
            unsafe { ptr::write_volatile(words.add(i), 0) };
        }
        // SAFETY: every byte is written, and all-zero is a valid `T` (the caller's promise).
        unsafe { self.0.assume_init_mut() }
    }
}
