//! Access to the packet of a TC or XDP program: bounds-checked header pointers, and the context
//! of a subprogram.

use core::{mem, ptr};

use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    programs::{TcContext, XdpContext},
};

use crate::verdict::Error;

/// The context of a subprogram. One volatile read of it keeps the compiler from passing the
/// subprogram loaded packet pointers in place of the context pointer (argument promotion),
/// which the verifier would refuse.
#[inline(always)]
pub fn subprogram_ctx(skb: *mut __sk_buff) -> TcContext {
    // SAFETY: the context pointer the kernel passed to the program.
    unsafe { ptr::read_volatile(&raw const (*skb).len) };
    TcContext::new(skb)
}

/// A program context whose packet data is directly readable (TC and XDP), for the code both
/// programs share (header pointers, socket lookups).
pub trait Packet: EbpfContext {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
}

/// A pointer to a `T` at `off` bytes into the packet, if the packet is long enough.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, off: usize) -> Result<*const T, Error> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + mem::size_of::<T>() > end {
        return Err(Error::Truncated);
    }
    Ok((start + off) as *const T)
}
