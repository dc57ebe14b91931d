//! The direct-mapped slot tables (`PORT_SLOTS`, `HOSTS_V4`, `HOSTS_V6`) in front of the
//! authoritative maps (`SERVICES`; the rules of single addresses and the LPM tries of prefixes).
//!
//! The classifier decides most packets after one read of a slot: `SLOT_EMPTY` (nothing here),
//! `SLOT_ONE` (the one entry mapping here, whose address must still match), `SLOT_MANY`
//! (consult the authoritative maps), or in the host tables `SLOT_EXACT` (several single
//! addresses and no prefix: their hash map alone decides, the trie is not walked). User space keeps the tables in line with the authoritative
//! maps by computing what every slot should be and writing the difference, through a shared
//! mapping of the array so that it controls the order of its stores:
//!
//! - the kind and the data of a slot never change in the same step;
//! - data is written only while the kind says "ignore data" (`SLOT_EMPTY`/`SLOT_MANY`/`SLOT_EXACT`), and the
//!   kind becomes `SLOT_ONE` afterwards (a release store);
//! - a slot that left `SLOT_ONE` may still be read by a classifier run that saw it as `SLOT_ONE`
//!   (it is *dirty*, since the time in `_pad`); its data is rewritten only after an RCU grace
//!   period, which every such run has finished by then (classifiers run inside RCU read-side
//!   sections). A grace period costs ~10 ms, so it is skipped when it cannot matter: when the
//!   fields the classifier reads do not change (a torn read then reads the same values), and for
//!   slots dirty for longer than [`STALE_SECS`] (the kernel reports an RCU reader that long as a
//!   stall: no classifier run lasts that long). A grace period cleans every dirty slot.
//!
//! - one exception: a host rule that only starts or stops draining changes one aligned word in
//!   place ([`SlotData::update_in_place`]), which a reader sees whole.
//!
//! So a classifier run never trusts half-written data. Callers write the authoritative maps
//! first, then the slots; everything happens under the instance lock.

use std::{
    collections::BTreeMap,
    marker::PhantomData,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use aya::maps::MapData;
use redirector_common::{Addr, HostData, RuleValue, SLOT_EMPTY, SLOT_EXACT, SLOT_MANY, SLOT_ONE, Slot, host_slot};

use super::{Error, Prefix, Result, types::to16};

// `HostData::update_in_place` stores `drain_until_ns` as one aligned word.
const _: () = assert!(std::mem::offset_of!(redirector_common::HostSlot, data.rule.drain_until_ns).is_multiple_of(8) && align_of::<redirector_common::HostSlot>() == 8);

/// Seconds after which a dirty slot is clean without a grace period: longer than the kernel's
/// RCU stall timeout (21 s by default), after which a reader still running is a kernel bug.
pub const STALE_SECS: u32 = 30;

/// The data of a slot: which of its fields the classifier reads.
pub trait SlotData: Copy + PartialEq {
    /// Whether a classifier run would decide the same with `self` and `other` (and so with any
    /// torn mix of them).
    fn same_for_readers(&self, other: &Self) -> bool;

    /// Makes the live data at `at` (now `self`) `new` in place, if the difference is one a
    /// reader sees whole, old or new, and either is right while it changes. Returns whether it
    /// did; if not, the slot goes through the steps of [`SlotTable::apply`].
    ///
    /// # Safety
    /// `at` points at the data of a slot of the mapping, which holds `self`.
    unsafe fn update_in_place(&self, at: *mut Self, new: &Self) -> bool;
}

impl SlotData for redirector_common::PortData {
    fn same_for_readers(&self, other: &Self) -> bool {
        self == other
    }

    unsafe fn update_in_place(&self, _: *mut Self, _: &Self) -> bool {
        false
    }
}

impl SlotData for HostData {
    fn same_for_readers(&self, other: &Self) -> bool {
        // `since_unix` is only for listings.
        self.addr == other.addr && self.rule.target == other.rule.target && self.rule.drain_until_ns == other.rule.drain_until_ns
    }

    /// A rule that starts or stops draining (same client, same target: every hand-back, and
    /// every client moved out again before its drained rule was collected) changes only
    /// `drain_until_ns`, one aligned 8-byte word the classifier loads at once; a run during the
    /// store decides as just before or just after it, both right then. So it skips the grace
    /// period (about 10 ms per call) that rewriting a whole slot needs.
    unsafe fn update_in_place(&self, at: *mut Self, new: &Self) -> bool {
        if self.addr != new.addr || self.rule.target != new.rule.target {
            return false;
        }
        // SAFETY: `at` is a slot's data (caller); `RuleValue` is `repr(C)` with
        // `drain_until_ns` at an 8-byte offset of an 8-byte-aligned slot.
        unsafe {
            AtomicU64::from_ptr(&raw mut (*at).rule.drain_until_ns).store(new.rule.drain_until_ns, Ordering::Release);
            // Only listings read it (from the tries, not from here).
            std::ptr::write_volatile(&raw mut (*at).rule.since_unix, new.rule.since_unix);
        }
        true
    }
}

/// `CLOCK_MONOTONIC` in whole seconds, at least 1 (0 in `_pad` means clean).
fn now_secs() -> u32 {
    u32::try_from(super::monotonic_ns() / 1_000_000_000).unwrap_or(u32::MAX).max(1)
}

/// What a slot should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want<D> {
    Empty,
    One(D),
    Many,
    /// Several exact entries and nothing else (`SLOT_EXACT`, host tables only).
    Exact,
}

/// A shared mapping of a `BPF_F_MMAPABLE` array of `Slot<D>`.
pub struct SlotTable<D> {
    base: NonNull<Slot<D>>,
    len: u32,
    bytes: usize,
    _d: PhantomData<D>,
}

// SAFETY: the mapping is plain shared memory; all access goes through volatile or atomic
// operations, serialized by the instance lock in user space.
unsafe impl<D: Send> Send for SlotTable<D> {}

impl<D: SlotData> SlotTable<D> {
    /// Maps the array `map` of `len` slots.
    pub fn new(map: &MapData, name: &str, len: u32) -> Result<Self> {
        let stride = size_of::<Slot<D>>();
        assert!(stride.is_multiple_of(8) && align_of::<Slot<D>>() <= 8, "array elements are 8-byte aligned");
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (stride * len as usize).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF array fd with its own size; checked for failure below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(Error::io(format!("mapping {name} (needs BPF_F_MMAPABLE)"), std::io::Error::last_os_error()));
        }
        let base = NonNull::new(p.cast::<Slot<D>>()).ok_or_else(|| Error::invalid(format!("mapping {name}: null")))?;
        Ok(Self { base, len, bytes, _d: PhantomData })
    }

    fn at(&self, i: u32) -> *mut Slot<D> {
        assert!(i < self.len, "slot {i} out of {}", self.len);
        // SAFETY: in bounds of the mapping.
        unsafe { self.base.as_ptr().add(i as usize) }
    }

    fn kind_cell(&self, i: u32) -> &AtomicU32 {
        // SAFETY: a valid, aligned u32 inside the mapping, for the life of &self.
        unsafe { AtomicU32::from_ptr(&raw mut (*self.at(i)).kind) }
    }

    fn pad_cell(&self, i: u32) -> &AtomicU32 {
        // SAFETY: as in kind_cell.
        unsafe { AtomicU32::from_ptr(&raw mut (*self.at(i))._pad) }
    }

    fn data(&self, i: u32) -> D {
        // SAFETY: a valid slot; volatile because the kernel shares it.
        unsafe { std::ptr::read_volatile(&raw const (*self.at(i)).data) }
    }

    /// The slot's kind and data.
    pub fn get(&self, i: u32) -> (u32, D) {
        (self.kind_cell(i).load(Ordering::Acquire), self.data(i))
    }

    /// Makes every slot what `wanted` says (slots not in it: empty), in the order that keeps
    /// readers safe. Returns how many slots changed.
    pub fn apply(&self, wanted: &BTreeMap<u32, Want<D>>) -> usize {
        // Both in ascending order: one walk, no lookup per slot.
        let mut next = wanted.iter().peekable();
        self.apply_each((0..self.len).map(|i| match next.peek() {
            Some((j, w)) if **j == i => {
                let w = **w;
                next.next();
                (i, w)
            }
            _ => (i, Want::Empty),
        }))
    }

    /// Makes the slots of `wanted` what it says and leaves the others as they are (a change
    /// of a few rules: the table is not walked). Returns how many slots changed.
    pub fn apply_some(&self, wanted: &BTreeMap<u32, Want<D>>) -> usize {
        self.apply_each(wanted.iter().map(|(i, w)| (*i, *w)))
    }

    /// [`SlotTable::apply`]'s steps for the slots `wanted` names, in ascending order.
    fn apply_each(&self, wanted: impl Iterator<Item = (u32, Want<D>)>) -> usize {
        let mut ones: Vec<(u32, D)> = Vec::new();
        let mut changed = 0;
        let mut grace = false;
        let now = now_secs();
        // Step 1: kinds that ignore data; slots leaving SLOT_ONE become dirty.
        for (i, w) in wanted {
            let (kind, data) = self.get(i);
            let target = match w {
                Want::Empty => SLOT_EMPTY,
                Want::Many => SLOT_MANY,
                Want::Exact => SLOT_EXACT,
                Want::One(d) if kind == SLOT_ONE && data == d => continue,
                // SAFETY: the data of slot `i`, which holds `data`.
                Want::One(d) if kind == SLOT_ONE && unsafe { data.update_in_place(&raw mut (*self.at(i)).data, &d) } => {
                    changed += 1;
                    continue;
                }
                Want::One(d) => {
                    ones.push((i, d));
                    if kind == SLOT_ONE { SLOT_MANY } else { kind }
                }
            };
            if kind == target {
                continue;
            }
            if kind == SLOT_ONE {
                self.pad_cell(i).store(now, Ordering::Relaxed);
            }
            self.kind_cell(i).store(target, Ordering::Release);
            changed += 1;
        }
        for &(i, d) in &ones {
            let since = self.pad_cell(i).load(Ordering::Relaxed);
            let dirty = since != 0 && now.saturating_sub(since) < STALE_SECS;
            grace |= dirty && !self.data(i).same_for_readers(&d);
        }
        if ones.is_empty() {
            return changed;
        }
        // Step 2: readers that saw SLOT_ONE before step 1 are done after a grace period, and
        // then every slot is clean.
        if grace {
            synchronize_rcu();
            for i in 0..self.len {
                if self.pad_cell(i).load(Ordering::Relaxed) != 0 {
                    self.pad_cell(i).store(0, Ordering::Relaxed);
                }
            }
        }
        // Step 3: data, while the kind still says "ignore data"; step 4: the kind.
        for &(i, d) in &ones {
            self.pad_cell(i).store(0, Ordering::Relaxed);
            // SAFETY: a valid slot; no reader uses its data now.
            unsafe { std::ptr::write_volatile(&raw mut (*self.at(i)).data, d) };
        }
        for &(i, _) in &ones {
            self.kind_cell(i).store(SLOT_ONE, Ordering::Release);
        }
        changed + ones.len()
    }
}

impl<D> Drop for SlotTable<D> {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// Waits until every classifier run that started before has finished: `membarrier`'s global
/// command is a `synchronize_rcu()`. Where the kernel refuses it (`nohz_full`), sleeps far longer
/// than any run.
fn synchronize_rcu() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: a plain syscall without pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a host slot holding `now` (kind, data) should hold once the rule of the single address
/// `addr` (of the slot) becomes `rule` (`None`: removed), with no prefix changing: the slot
/// alone tells, no other rule is read. A slot another address holds goes to the hash map
/// (`Exact`); one a prefix covers stays `Many`. A removal leaves a slot the address shared
/// as it is: the maps behind it decide rightly, only more slowly than the slot could, until
/// [`want_hosts`] recomputes the table from every rule.
#[must_use]
pub fn host_change(now: (u32, HostData), addr: Addr, rule: Option<RuleValue>) -> Want<HostData> {
    let (kind, data) = now;
    match (kind, rule) {
        (SLOT_ONE, Some(rule)) if data.addr == addr => Want::One(HostData { addr, rule }),
        (SLOT_EMPTY, Some(rule)) => Want::One(HostData { addr, rule }),
        (SLOT_ONE, Some(_)) | (SLOT_EXACT, _) => Want::Exact,
        (SLOT_ONE, None) if data.addr == addr => Want::Empty,
        (SLOT_ONE, None) => Want::One(data),
        (SLOT_EMPTY, None) => Want::Empty,
        _ => Want::Many,
    }
}

/// What the host slots of `changes` (single addresses of one family, each with its new rule,
/// `None`: removed; no prefix changing) should hold, from what they hold now (`current`),
/// by [`host_change`], in order: changes of one slot see each other.
#[must_use]
pub fn host_changes(current: impl Fn(u32) -> (u32, HostData), changes: &[(Addr, Option<RuleValue>)]) -> BTreeMap<u32, Want<HostData>> {
    let mut want: BTreeMap<u32, Want<HostData>> = BTreeMap::new();
    for (addr, rule) in changes {
        let i = host_slot(addr);
        let now = match want.get(&i) {
            None => current(i),
            Some(Want::One(d)) => (SLOT_ONE, *d),
            Some(Want::Empty) => (SLOT_EMPTY, current(i).1),
            Some(Want::Exact) => (SLOT_EXACT, current(i).1),
            Some(Want::Many) => (SLOT_MANY, current(i).1),
        };
        want.insert(i, host_change(now, *addr, *rule));
    }
    want
}

/// The slots a prefix covers: `None` for all of them (too short to be one range).
#[must_use]
pub fn covered(prefix: Prefix) -> Option<std::ops::Range<u32>> {
    let full: u8 = if prefix.addr.is_ipv4() { 32 } else { 128 };
    let host_bits = u32::from(full - prefix.len);
    if host_bits > 16 {
        return None;
    }
    let first = host_slot(&to16(prefix.addr));
    Some(first..first + (1 << host_bits))
}

/// What the slots of one family's host table should be, from that family's rules (slots not
/// listed: empty).
#[must_use]
pub fn want_hosts(rules: &[(Prefix, RuleValue)], v6: bool) -> BTreeMap<u32, Want<HostData>> {
    let full: u8 = if v6 { 128 } else { 32 };
    let mut want: BTreeMap<u32, Want<HostData>> = BTreeMap::new();
    let mut all_many = false;
    // Single addresses first: a slot several share is `Exact` unless a prefix covers it.
    for (p, r) in rules.iter().filter(|(p, _)| p.addr.is_ipv6() == v6 && p.len == full) {
        let addr: Addr = to16(p.addr);
        let one = Want::One(HostData { addr, rule: *r });
        want.entry(host_slot(&addr)).and_modify(|w| *w = Want::Exact).or_insert(one);
    }
    for (p, _) in rules.iter().filter(|(p, _)| p.addr.is_ipv6() == v6 && p.len != full) {
        match covered(*p) {
            Some(range) => {
                for i in range {
                    want.insert(i, Want::Many);
                }
            }
            None => all_many = true,
        }
    }
    if all_many {
        want = (0..redirector_common::HOST_SLOT_COUNT).map(|i| (i, Want::Many)).collect();
    }
    want
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::datapath::types;

    fn rule(t: u8) -> RuleValue {
        RuleValue { target: to16(IpAddr::V4(Ipv4Addr::new(198, 18, 0, t))), drain_until_ns: 0, since_unix: 0 }
    }

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn one_host_rule_fills_its_slot_and_nothing_else() {
        let w = want_hosts(&[(p("198.18.1.5"), rule(2))], false);
        assert_eq!(w.len(), 1);
        let Some(Want::One(d)) = w.get(&0x0105) else { panic!("slot 0x0105: {w:?}") };
        assert_eq!(d.addr, to16("198.18.1.5".parse().unwrap()));
        assert_eq!(d.rule, rule(2));
        assert!(want_hosts(&[(p("198.18.1.5"), rule(2))], true).is_empty(), "IPv4 rules stay out of the IPv6 table");
        let sorted = want_hosts(&[(p("198.18.2.9"), rule(2)), (p("198.18.1.5"), rule(3))], false);
        assert_eq!(sorted.keys().copied().collect::<Vec<_>>(), vec![0x0105, 0x0209], "ascending by slot");
    }

    #[test]
    fn colliding_hosts_send_readers_to_their_map_and_prefixes_to_the_trie() {
        // Same low 16 bits, different addresses: the hosts' map decides, no prefix is near.
        let w = want_hosts(&[(p("198.18.1.5"), rule(2)), (p("198.19.1.5"), rule(3))], false);
        assert_eq!(w.get(&0x0105), Some(&Want::Exact));
        assert_eq!(w.len(), 1);
        // A /24 covers 256 slots; a host inside stays MANY (its own rule, then the prefix's),
        // in whichever order the rules come.
        for rules in [[(p("198.18.2.0/24"), rule(2)), (p("198.18.2.9"), rule(3))], [(p("198.18.2.9"), rule(3)), (p("198.18.2.0/24"), rule(2))]] {
            let w = want_hosts(&rules, false);
            assert_eq!(w.len(), 256);
            assert!((0x0200..0x0300).all(|i| w.get(&i) == Some(&Want::Many)));
        }
        // Colliding hosts under a prefix: MANY too (the trie must still be asked for others).
        let w = want_hosts(&[(p("198.18.2.9"), rule(2)), (p("198.19.2.9"), rule(3)), (p("198.18.2.0/24"), rule(2))], false);
        assert_eq!(w.get(&0x0209), Some(&Want::Many));
        // A /8 covers every slot.
        let w = want_hosts(&[(p("10.0.0.0/8"), rule(2))], false);
        assert_eq!(w.len(), 65_536);
    }

    #[test]
    fn prefix_ranges() {
        assert_eq!(covered(p("198.18.1.5/32")), Some(0x0105..0x0106));
        assert_eq!(covered(p("198.18.0.0/16")), Some(0..0x1_0000));
        assert_eq!(covered(p("198.16.0.0/15")), None);
        assert_eq!(covered(p("2001:db8::100/120")), Some(0x0100..0x0200));
        assert_eq!(covered(p("2001:db8::/64")), None);
    }

    fn addr(s: &str) -> Addr {
        to16(s.parse().unwrap())
    }

    fn one(a: &str, t: u8) -> HostData {
        HostData { addr: addr(a), rule: rule(t) }
    }

    #[test]
    fn a_changed_address_changes_its_slot_as_the_slot_says() {
        let empty = HostData { addr: [0; 16], rule: rule(0) };
        let (a, b) = ("198.18.1.5", "198.19.1.5");
        assert_eq!(host_change((SLOT_EMPTY, empty), addr(a), Some(rule(2))), Want::One(one(a, 2)));
        assert_eq!(host_change((SLOT_ONE, one(a, 2)), addr(a), Some(rule(3))), Want::One(one(a, 3)), "its own rule changes");
        assert_eq!(host_change((SLOT_ONE, one(b, 2)), addr(a), Some(rule(3))), Want::Exact, "another address is there: the map decides");
        assert_eq!(host_change((SLOT_ONE, one(a, 2)), addr(a), None), Want::Empty);
        assert_eq!(host_change((SLOT_ONE, one(b, 2)), addr(a), None), Want::One(one(b, 2)), "not its slot's address: left alone");
        assert_eq!(host_change((SLOT_EXACT, empty), addr(a), None), Want::Exact);
        assert_eq!(host_change((SLOT_MANY, empty), addr(a), Some(rule(2))), Want::Many, "a prefix covers it");
        // Changes of one slot in one call see each other.
        let current = |_| (SLOT_EMPTY, empty);
        assert_eq!(host_changes(current, &[(addr(a), Some(rule(2))), (addr(b), Some(rule(3)))]).get(&0x0105), Some(&Want::Exact));
        assert_eq!(host_changes(current, &[(addr(a), Some(rule(2))), (addr(a), None)]).get(&0x0105), Some(&Want::Empty));
    }

    /// What the classifier finds for `a` with host slots `slots` over the hash map `map` (no
    /// prefixes): a slot of one address answers for it alone; `Exact` and `Many` ask the map.
    fn classify(slots: &BTreeMap<u32, Want<HostData>>, map: &BTreeMap<Addr, RuleValue>, a: Addr) -> Option<RuleValue> {
        match slots.get(&host_slot(&a)) {
            None | Some(Want::Empty) => None,
            Some(Want::One(d)) => (d.addr == a).then_some(d.rule),
            Some(Want::Exact | Want::Many) => map.get(&a).copied(),
        }
    }

    #[test]
    fn slots_changed_one_address_at_a_time_decide_as_the_rules_do() {
        // 24 addresses over 4 slots (198.18-19.x.y with the same low 16 bits collide), random
        // rules added, changed, drained and removed a few at a time: after every call, every
        // address is decided by its slot as its rule says, and a full recomputation from the
        // rules agrees on every decision.
        let addrs: Vec<Addr> = (0..24u32).map(|i| addr(&format!("198.{}.{}.{}", 18 + i % 2, 1 + i / 8, 5 + (i / 2) % 4))).collect();
        let (mut map, mut slots): (BTreeMap<Addr, RuleValue>, BTreeMap<u32, Want<HostData>>) = (BTreeMap::new(), BTreeMap::new());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..2_000 {
            let calls = 1 + next(3);
            let mut changes = Vec::new();
            for _ in 0..calls {
                let a = addrs[usize::try_from(next(24)).unwrap()];
                let new = if next(3) == 0 { None } else { Some(rule(u8::try_from(1 + next(4)).unwrap())) };
                changes.push((a, new));
            }
            let empty = HostData { addr: [0; 16], rule: rule(0) };
            let want = host_changes(
                |i| match slots.get(&i) {
                    None | Some(Want::Empty) => (SLOT_EMPTY, empty),
                    Some(Want::One(d)) => (SLOT_ONE, *d),
                    Some(Want::Exact) => (SLOT_EXACT, empty),
                    Some(Want::Many) => (SLOT_MANY, empty),
                },
                &changes,
            );
            for (a, new) in &changes {
                match new {
                    Some(r) => map.insert(*a, *r),
                    None => map.remove(a),
                };
            }
            slots.extend(want);
            let rules: Vec<(Prefix, RuleValue)> = map.iter().map(|(a, r)| (Prefix { addr: types::from16(a), len: 32 }, *r)).collect();
            let full = want_hosts(&rules, false);
            for a in &addrs {
                assert_eq!(classify(&slots, &map, *a), map.get(a).copied(), "{:?} after {changes:?}", types::from16(a));
                assert_eq!(classify(&full, &map, *a), map.get(a).copied());
            }
        }
    }
}
