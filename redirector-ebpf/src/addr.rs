//! Addresses as four native-order words: how socket tuples, socket contexts and the slot
//! tables hold them; IPv4-mapped addresses built without `memset`.

use redirector_common::Addr;

/// An address as four native-order words, the way the slot tables are compared.
#[inline(always)]
pub fn words(a: &Addr) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// The address whose four native-order words are `w` (an IPv6 address as a socket context
/// gives it): the inverse of [`words`].
#[inline(always)]
pub fn from_words(w: [u32; 4]) -> Addr {
    let mut a = [0u8; 16];
    a[0..4].copy_from_slice(&w[0].to_ne_bytes());
    a[4..8].copy_from_slice(&w[1].to_ne_bytes());
    a[8..12].copy_from_slice(&w[2].to_ne_bytes());
    a[12..16].copy_from_slice(&w[3].to_ne_bytes());
    a
}

/// `redirector_common::v4_mapped`, built as one 128-bit value: written out byte by byte, its ten
/// zero bytes compile to a call of `memset`, a loop storing one byte per turn (about 55
/// instructions), on every packet of the paths that use this one (a tunnelled packet on the
/// target builds four such addresses). Not used everywhere: in some functions the 128-bit value
/// leads the compiler to code the verifier refuses (it merged sock_ops' four 4-byte context
/// reads of an IPv6 address into 8-byte ones); the tests load every program.
#[inline(always)]
pub fn mapped_v4(a: [u8; 4]) -> Addr {
    (0xffff_0000_0000 | u128::from(u32::from_be_bytes(a))).to_be_bytes()
}
