//! The migrated clients of the origin: the tries hold every rule, the host slot tables let
//! the common packet find a client's rule (or learn there is none) with one array read.

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LpmTrie, lpm_trie::Key},
};
use redirector_common::{Addr, BPF_F_MMAPABLE, HOST_SLOT_COUNT, HostSlot, MAX_RULES, RuleValue, SLOT_MANY, SLOT_ONE, host_slot};

use crate::{
    addr::words,
    slot::{addr_is, kind_of, read},
};

#[map]
static MIGRATED_V4: LpmTrie<[u8; 4], RuleValue> = LpmTrie::pinned(MAX_RULES, 0);
#[map]
static MIGRATED_V6: LpmTrie<[u8; 16], RuleValue> = LpmTrie::pinned(MAX_RULES, 0);
/// Migrated IPv4 clients by the low 16 bits of their address, in front of `MIGRATED_V4`.
#[map]
static HOSTS_V4: Array<HostSlot> = Array::pinned(HOST_SLOT_COUNT, BPF_F_MMAPABLE);
/// Migrated IPv6 clients by the low 16 bits of their address, in front of `MIGRATED_V6`.
#[map]
static HOSTS_V6: Array<HostSlot> = Array::pinned(HOST_SLOT_COUNT, BPF_F_MMAPABLE);

/// The rule of IPv4 client `src`, if it is migrated: from its slot, or from the trie when the
/// slot is shared.
#[inline(always)]
pub fn host_rule_v4(src: [u8; 4]) -> Option<RuleValue> {
    let slot = HOSTS_V4.get_ptr((u32::from(src[2]) << 8) | u32::from(src[3]))?;
    // SAFETY: a valid map value; fields are read in place, in order.
    match kind_of(unsafe { &raw const (*slot).kind }) {
        // HOSTS_V4 holds IPv4-mapped addresses only: the last word decides.
        SLOT_ONE => unsafe { (read((&raw const (*slot).data.addr).cast::<u32>().wrapping_add(3)) == u32::from_ne_bytes(src)).then(|| read(&raw const (*slot).data.rule)) },
        SLOT_MANY => MIGRATED_V4.get(Key::new(32, src)).copied(),
        _ => None,
    }
}

/// The rule of IPv6 client `src`, if it is migrated.
#[inline(always)]
pub fn host_rule_v6(src: &Addr) -> Option<RuleValue> {
    let slot = HOSTS_V6.get_ptr(host_slot(src))?;
    // SAFETY: a valid map value; fields are read in place, in order.
    match kind_of(unsafe { &raw const (*slot).kind }) {
        SLOT_ONE => unsafe { addr_is(&raw const (*slot).data.addr, &words(src)).then(|| read(&raw const (*slot).data.rule)) },
        SLOT_MANY => MIGRATED_V6.get(Key::new(128, *src)).copied(),
        _ => None,
    }
}

/// The time `rule`'s drain is measured against: the clock is read only for a draining rule.
#[inline(always)]
pub fn now_if_draining(rule: &RuleValue) -> u64 {
    // SAFETY: a plain helper call.
    if rule.drain_until_ns == 0 { 0 } else { unsafe { bpf_ktime_get_ns() } }
}
