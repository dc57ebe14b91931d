//! The services a target adopted from its siblings: decapsulation, the egress clamp and
//! `sk_lookup` serve only these.

use aya_ebpf::{macros::map, maps::HashMap};
use redirector_common::{AdoptedValue, MAX_LISTENERS, ServiceKey};

#[map]
static ADOPTED: HashMap<ServiceKey, AdoptedValue> = HashMap::pinned(MAX_LISTENERS, 0);
/// Not used by the programs: user space keeps here the original interface settings it changed
/// on a target, to put them back (key: ifindex << 8 | setting).
#[map]
static SYSCTLS: HashMap<u32, u32> = HashMap::pinned(1024, 0);

/// Whether service `key` is adopted here.
#[inline(always)]
pub fn is_adopted(key: ServiceKey) -> bool {
    ADOPTED.get_ptr(key).is_some()
}

/// The MSS clamp of adopted service `key`, if it is adopted here.
#[inline(always)]
pub fn mss_clamp(key: ServiceKey) -> Option<u16> {
    // SAFETY: map values are plain data.
    unsafe { ADOPTED.get(key) }.map(|a| a.mss_clamp)
}
