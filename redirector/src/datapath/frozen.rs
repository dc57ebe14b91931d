//! Freezing flows on the origin while their connections move (`redirector_ingress` drops
//! their packets; see redirector-ebpf's `frozen`): the dumped socket must not acknowledge
//! what would be lost with it.

use std::{net::SocketAddr, time::Duration};

use aya::maps::{Array, HashMap, MapData};
use redirector_common::{FlowKey, maps};

use super::{Datapath, Error, Result, monotonic_ns, types::to16};

/// A flow as the classifier sees it: the client's end and the service's.
fn key(client: SocketAddr, service: SocketAddr) -> FlowKey {
    FlowKey { client: to16(client.ip()), service: to16(service.ip()), client_port: client.port().to_be_bytes(), service_port: service.port().to_be_bytes() }
}

impl Datapath {
    /// Freezes `flows` (client, service): their inbound packets are dropped until
    /// [`Datapath::thaw`], or for at most `max` (should nobody thaw them), whether their
    /// clients are steered or not.
    ///
    /// # Errors
    /// A map could not be written (the map holds at most `MAX_FROZEN` flows).
    pub fn freeze(&mut self, flows: &[(SocketAddr, SocketAddr)], max: Duration) -> Result<()> {
        let until = monotonic_ns().saturating_add(u64::try_from(max.as_nanos()).unwrap_or(u64::MAX));
        {
            let mut frozen: HashMap<&mut MapData, FlowKey, u64> = self.open_map(maps::FROZEN)?;
            for (c, s) in flows {
                frozen.insert(key(*c, *s), until, 0).map_err(|e| Error::bpf(format!("freezing {c} -> {s}"), e))?;
            }
        }
        let any = !flows.is_empty() || self.frozen_count()? > 0;
        self.set_frozen_flag(any)
    }

    /// Lets `flows` through again (those not frozen are ignored).
    ///
    /// # Errors
    /// A map could not be written.
    pub fn thaw(&mut self, flows: &[(SocketAddr, SocketAddr)]) -> Result<()> {
        {
            let mut frozen: HashMap<&mut MapData, FlowKey, u64> = self.open_map(maps::FROZEN)?;
            for (c, s) in flows {
                match frozen.remove(&key(*c, *s)) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    // How aya reports a key that is not there.
                    Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(Error::bpf(format!("thawing {c} -> {s}"), e)),
                }
            }
        }
        let any = self.frozen_count()? > 0;
        self.set_frozen_flag(any)
    }

    /// Lets every frozen flow through again: for an agent that starts, whose predecessor's
    /// moves are decided by now (their connections live on one side or the other, and
    /// each freeze would otherwise last its full limit).
    ///
    /// # Errors
    /// A map could not be read or written.
    pub fn thaw_all(&mut self) -> Result<usize> {
        let keys: Vec<FlowKey> = {
            let frozen: HashMap<&mut MapData, FlowKey, u64> = self.open_map(maps::FROZEN)?;
            frozen.keys().collect::<std::result::Result<_, _>>().map_err(|e| Error::bpf("reading FROZEN", e))?
        };
        {
            let mut frozen: HashMap<&mut MapData, FlowKey, u64> = self.open_map(maps::FROZEN)?;
            for k in &keys {
                match frozen.remove(k) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(Error::bpf("thawing", e)),
                }
            }
        }
        self.set_frozen_flag(false)?;
        Ok(keys.len())
    }

    /// Flows frozen now (expired freezes included until thawed).
    ///
    /// # Errors
    /// The map could not be read.
    pub fn frozen_count(&mut self) -> Result<usize> {
        let frozen: HashMap<&mut MapData, FlowKey, u64> = self.open_map(maps::FROZEN)?;
        frozen.keys().try_fold(0, |n, k| k.map(|_| n + 1)).map_err(|e| Error::bpf("reading FROZEN", e))
    }

    /// Tells the classifier whether to look flows up at all.
    fn set_frozen_flag(&mut self, any: bool) -> Result<()> {
        let mut flag: Array<&mut MapData, u32> = self.open_map(maps::FROZEN_ANY)?;
        flag.set(0, u32::from(any), 0).map_err(|e| Error::bpf("setting FROZEN_ANY", e))
    }
}
