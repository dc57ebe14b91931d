//! The kernel programs' log lines, read as they come into the agent's log.

use std::sync::Arc;

use tracing::warn;

use super::{Agent, flat};
use crate::datapath::Datapath;

impl Agent {
    /// Writes the lines of the programs this agent attached into its log as they come.
    pub(super) async fn kernel_log(self: Arc<Self>) {
        let log = match flat(self.with_dp(Datapath::take_kernel_log).await) {
            Ok(l) => l,
            Err(e) => return warn!("the kernel programs' log lines will not be shown (their counters still count): {e}"),
        };
        // SAFETY: `KernelLog` owns its ring buffer's fd for its whole life and always returns
        // that same fd; the AsyncFd owns the `KernelLog`.
        let mut fd = match unsafe { tokio::io::unix::AsyncFd::register_with_interest(log, tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => return warn!("watching the kernel programs' log: {e}"),
        };
        loop {
            let Ok(mut ready) = fd.readable_mut().await else { return };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }
}
