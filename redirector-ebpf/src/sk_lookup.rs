//! Delivery on the target (`sk_lookup`): connections to an adopted service address go to the
//! listener registered for it.

use core::ptr;

use aya_ebpf::{macros::map, maps::SockHash, programs::SkLookupContext};
use redirector_common::{Counter, MAX_LISTENERS, ServiceKey};

use crate::{
    addr::{from_words, mapped_v4},
    adopted::is_adopted,
    hdr::{AF_INET, AF_INET6, IPPROTO_TCP},
    report,
};

/// The listening socket registered for each adopted service.
#[map]
static LISTENERS: SockHash<ServiceKey> = SockHash::pinned(MAX_LISTENERS, 0);

/// Hands a connection to an adopted service to its listener. Returns the counter of what
/// happened, `None` for a connection that is not for an adopted service (the kernel's own
/// lookup handles it).
#[inline(always)]
pub fn deliver(ctx: &SkLookupContext) -> Option<Counter> {
    let l = ctx.lookup;
    // SAFETY: l is the kernel's bpf_sk_lookup; every field is read once, at its own offset and
    // size (the verifier rejects loads through a computed context pointer).
    let (family, protocol, port, ip4, ip6) = unsafe {
        (
            ptr::read_volatile(&raw const (*l).family),
            ptr::read_volatile(&raw const (*l).protocol),
            ptr::read_volatile(&raw const (*l).local_port),
            ptr::read_volatile(&raw const (*l).local_ip4),
            [
                ptr::read_volatile(&raw const (*l).local_ip6[0]),
                ptr::read_volatile(&raw const (*l).local_ip6[1]),
                ptr::read_volatile(&raw const (*l).local_ip6[2]),
                ptr::read_volatile(&raw const (*l).local_ip6[3]),
            ],
        )
    };
    if protocol != u32::from(IPPROTO_TCP) {
        return None;
    }
    let addr = match family {
        AF_INET => mapped_v4(ip4.to_ne_bytes()),
        AF_INET6 => from_words(ip6),
        _ => return None,
    };
    #[expect(clippy::cast_possible_truncation, reason = "ports are 16 bits")]
    let key = ServiceKey::new(addr, port as u16);
    if !is_adopted(key) {
        return None;
    }
    if LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok() {
        Some(Counter::SkAssigned)
    } else {
        // Adopted, but no listener registered (or it closed): the connection is refused.
        report::no_listener(&addr, key.port());
        Some(Counter::SkNoListener)
    }
}
