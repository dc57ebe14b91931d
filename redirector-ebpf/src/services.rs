//! The steered services of the origin: `SERVICES` holds every one, the port slot tables let
//! the common packet find its service (or learn there is none) with one array read.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use redirector_common::{Addr, BPF_F_MMAPABLE, MAX_SERVICES, PORT_SLOT_COUNT, PortSlot, SLOT_MANY, SLOT_ONE, ServiceKey, ServiceValue};

use crate::{
    addr::{mapped_v4, words},
    slot::{addr_is, kind_of, read},
};

#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);
/// The steered IPv4 service of each TCP port (one array read decides most packets).
#[map]
static PORT_SLOTS_V4: Array<PortSlot> = Array::pinned(PORT_SLOT_COUNT, BPF_F_MMAPABLE);
/// The steered IPv6 service of each TCP port.
#[map]
static PORT_SLOTS_V6: Array<PortSlot> = Array::pinned(PORT_SLOT_COUNT, BPF_F_MMAPABLE);

/// The steered service `key`, from `SERVICES` (for packets the port slots do not decide).
#[inline(always)]
pub fn service(key: ServiceKey) -> Option<ServiceValue> {
    // SAFETY: map values are plain data.
    unsafe { SERVICES.get(key) }.copied()
}

/// The steered IPv6 service at `dst` and TCP `port`: from the port's slot, or from `SERVICES`
/// when several addresses share the port.
#[inline(always)]
pub fn service_at_v6(dst: &Addr, port: [u8; 2]) -> Option<ServiceValue> {
    let slot = PORT_SLOTS_V6.get_ptr(u32::from(u16::from_be_bytes(port)))?;
    // SAFETY: a valid map value; fields are read in place, in order.
    match kind_of(unsafe { &raw const (*slot).kind }) {
        SLOT_ONE => unsafe { addr_is(&raw const (*slot).data.addr, &words(dst)).then(|| read(&raw const (*slot).data.service)) },
        SLOT_MANY => service(ServiceKey { addr: *dst, port, _pad: [0; 2] }),
        _ => None,
    }
}

/// The steered IPv4 service at `dst` (its four bytes as a native-order word) and TCP `port`.
#[inline(always)]
pub fn service_at_v4(dst: u32, dst4: [u8; 4], port: [u8; 2]) -> Option<ServiceValue> {
    let slot = PORT_SLOTS_V4.get_ptr(u32::from(u16::from_be_bytes(port)))?;
    // SAFETY: a valid map value; fields are read in place, in order.
    match kind_of(unsafe { &raw const (*slot).kind }) {
        // PORT_SLOTS_V4 holds IPv4-mapped addresses only: the last word decides.
        SLOT_ONE => unsafe { (read((&raw const (*slot).data.addr).cast::<u32>().wrapping_add(3)) == dst).then(|| read(&raw const (*slot).data.service)) },
        SLOT_MANY => service(ServiceKey { addr: mapped_v4(dst4), port, _pad: [0; 2] }),
        _ => None,
    }
}
