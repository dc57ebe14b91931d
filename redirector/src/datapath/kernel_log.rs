//! The kernel programs' own log lines (aya-log: rare events such as a dropped tunnelled packet
//! or a refused connection, see `redirector-ebpf/src/report.rs`), written into the agent's log.

use std::os::fd::{AsRawFd, RawFd};

use aya::programs::{SchedClassifier, SkLookup};
use aya_log::EbpfLogger;
use redirector_common::programs;

use super::{Datapath, Error, Result};

impl Datapath {
    /// Takes the log of this handle's programs (once per handle). Their lines reach the log
    /// only while they are the attached ones: the agent's handle attaches its own at start.
    /// Wait for its fd to be readable, then [`KernelLog::flush`].
    pub fn take_kernel_log(&mut self) -> Result<KernelLog> {
        // The programs that write the log's ring buffer are loaded with its fd before it
        // leaves `ebpf` (a program loaded later would find that fd closed).
        self.program::<SchedClassifier>(programs::INGRESS)?;
        self.program::<SchedClassifier>(programs::EGRESS)?;
        self.program::<SkLookup>(programs::SK_LOOKUP)?;
        let logger = EbpfLogger::init_with_logger(&mut self.ebpf, ToTracing).map_err(|e| Error::invalid(format!("opening the kernel programs' log: {e}")))?;
        Ok(KernelLog(logger))
    }
}

/// The kernel programs' log (see [`Datapath::take_kernel_log`]).
pub struct KernelLog(EbpfLogger<ToTracing>);

impl KernelLog {
    /// Writes every waiting line into the agent's log.
    pub fn flush(&mut self) {
        self.0.flush();
    }
}

impl AsRawFd for KernelLog {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Writes aya-log's records as the agent's own events, marked `from="kernel"`.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let line = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(from = "kernel", "{line}"),
            log::Level::Warn => tracing::warn!(from = "kernel", "{line}"),
            log::Level::Info => tracing::info!(from = "kernel", "{line}"),
            log::Level::Debug => tracing::debug!(from = "kernel", "{line}"),
            log::Level::Trace => tracing::trace!(from = "kernel", "{line}"),
        }
    }

    fn flush(&self) {}
}
