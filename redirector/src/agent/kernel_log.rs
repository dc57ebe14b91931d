//! The kernel programs' log lines, read as they come into the agent's log.

use std::sync::Arc;

use tracing::warn;

use super::{Agent, flat};
use crate::datapath::KernelLog;

impl Agent {
    /// Writes the lines of the programs this agent attached into its log as they come.
    pub(super) async fn kernel_log(self: Arc<Self>) {
        let log = match flat(self.with_dp(|d| d.take_kernel_log()).await) {
            Ok(l) => l,
            Err(e) => return warn!("the kernel programs' log lines will not be shown (their counters still count): {e}"),
        };
        super::ring::each_time_readable("the kernel programs' log", log, KernelLog::flush).await;
    }
}
