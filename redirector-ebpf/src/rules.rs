//! The migrated clients of the origin: hash maps hold the rules of single addresses, the
//! tries the prefix rules, and the host slot tables let the common packet find a client's rule
//! (or learn there is none) with one array read.
//!
//! Single addresses are not in the tries: a trie lookup walks one node per level, and with a
//! million addresses in it cost about 17x an empty program (`cargo xtask bench scale`); a hash
//! lookup costs the same at any size.

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
};
use redirector_common::{Addr, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, HOST_SLOT_COUNT, HostSlot, MAX_RULES, RuleValue, SLOT_EXACT, SLOT_MANY, SLOT_ONE, host_slot};

use crate::{
    addr::words,
    slot::{addr_is, kind_of, read},
};

/// Prefix rules (shorter than /32).
#[map]
static MIGRATED_V4: LpmTrie<[u8; 4], RuleValue> = LpmTrie::pinned(MAX_RULES, 0);
/// Prefix rules (shorter than /128).
#[map]
static MIGRATED_V6: LpmTrie<[u8; 16], RuleValue> = LpmTrie::pinned(MAX_RULES, 0);
/// Rules of single IPv4 addresses: a more specific rule than any prefix's.
#[map]
static HOST_RULES_V4: HashMap<[u8; 4], RuleValue> = HashMap::pinned(MAX_RULES, BPF_F_NO_PREALLOC);
/// Rules of single IPv6 addresses.
#[map]
static HOST_RULES_V6: HashMap<[u8; 16], RuleValue> = HashMap::pinned(MAX_RULES, BPF_F_NO_PREALLOC);
/// Migrated IPv4 clients by the low 16 bits of their address, in front of `MIGRATED_V4`.
#[map]
static HOSTS_V4: Array<HostSlot> = Array::pinned(HOST_SLOT_COUNT, BPF_F_MMAPABLE);
/// Migrated IPv6 clients by the low 16 bits of their address, in front of `MIGRATED_V6`.
#[map]
static HOSTS_V6: Array<HostSlot> = Array::pinned(HOST_SLOT_COUNT, BPF_F_MMAPABLE);

/// The rule of IPv4 client `src`, if it is migrated: from its slot, or from the maps when the
/// slot is shared (its own rule first, then a prefix's if a prefix covers the slot).
#[inline(always)]
pub fn host_rule_v4(src: [u8; 4]) -> Option<RuleValue> {
    let slot = HOSTS_V4.get_ptr((u32::from(src[2]) << 8) | u32::from(src[3]))?;
    // SAFETY: a valid map value; fields are read in place, in order.
    match kind_of(unsafe { &raw const (*slot).kind }) {
        // HOSTS_V4 holds IPv4-mapped addresses only: the last word decides.
        SLOT_ONE => unsafe { (read((&raw const (*slot).data.addr).cast::<u32>().wrapping_add(3)) == u32::from_ne_bytes(src)).then(|| read(&raw const (*slot).data.rule)) },
        // SAFETY: a plain map lookup; the value is copied out at once.
        SLOT_EXACT => unsafe { HOST_RULES_V4.get(src).copied() },
        SLOT_MANY => unsafe { HOST_RULES_V4.get(src).copied() }.or_else(|| MIGRATED_V4.get(Key::new(32, src)).copied()),
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
        // SAFETY: as above.
        SLOT_EXACT => unsafe { HOST_RULES_V6.get(src).copied() },
        SLOT_MANY => unsafe { HOST_RULES_V6.get(src).copied() }.or_else(|| MIGRATED_V6.get(Key::new(128, *src)).copied()),
        _ => None,
    }
}

/// The time `rule`'s drain is measured against: the clock is read only for a draining rule.
#[inline(always)]
pub fn now_if_draining(rule: &RuleValue) -> u64 {
    // SAFETY: a plain helper call.
    if rule.drain_until_ns == 0 { 0 } else { unsafe { bpf_ktime_get_ns() } }
}
