//! Certificates running out: an agent warns, when it starts and then every day, while its own
//! certificate or the cluster CA has fewer than [`WARN_DAYS`] left (siblings refuse an
//! expired one, so the node would drop out of the cluster). An expired one stops it at start.

use std::time::Duration;

use tracing::{error, warn};

use crate::{
    config::TlsFiles,
    peer::tls::{WARN_DAYS, expiry},
};

/// Warns now and every day about the certificates of `files` that expire soon.
pub(super) async fn warn_daily(files: TlsFiles) {
    loop {
        for (what, path) in [("this node's certificate", &files.cert), ("the cluster CA", &files.ca)] {
            match expiry(path) {
                Ok(Some(days)) => warn!(cert = %path.display(), days_left = days, "{what} expires in under {WARN_DAYS} days: renew it with `redirector tls` and restart the agent"),
                Ok(None) => {}
                Err(e) => error!("{what}: {e}: siblings refuse it; renew it with `redirector tls` and restart the agent"),
            }
        }
        tokio::time::sleep(Duration::from_hours(24)).await;
    }
}
