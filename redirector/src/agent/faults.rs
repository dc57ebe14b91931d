//! Faults a test can inject into an agent (environment variable `REDIRECTOR_TEST_FAULTS`, a
//! comma-separated list), to reach the hand-over's failure paths with real processes. Only a
//! build with the cargo feature `test-faults` (what `cargo xtask test` builds) reads them; any
//! other agent refuses to start while the variable is set, so that a production agent can
//! never misbehave on purpose. An agent that reads them warns at start.
//!
//! Pauses, each `NAME=MS` (the agent waits MS ms there, logging `TEST FAULT NAME`), in the
//! order a hand-over reaches them; they apply to both directions unless said otherwise:
//! - `pause-after-export`: the exporting side (the origin out, the volunteer back), after its
//!   applications exported and their sessions left (they go as they arrive), before the
//!   `Transfer` or `Returning` that counts them.
//! - `pause-before-rules`: the origin, after the volunteer acknowledged (out) or its own
//!   applications imported (back), before it changes its rules (the commit point).
//! - `pause-between-families`: the origin, after a hand-over's IPv4 rules went in, before its
//!   IPv6 ones (out).
//! - `pause-before-commit`: the origin, after its rules changed (the commit point), before it
//!   tells anyone.
//!
//! Others:
//! - `drop-abort`: the origin never sends `Abort` to a volunteer (as if every one were lost).
//! - `drop-sessions-frame`: the origin leaves out the first `Sessions` frame that carries
//!   sessions (as if a link flap lost it).
//! - `delay-ack=MS`: the volunteer waits MS ms after a transfer is ready before acknowledging.
//! - `delay-commit=MS`: each `Commit` waits MS ms on its link before it is written, while the
//!   origin goes on (as if that connection were slow: what the origin says next on the other
//!   connection arrives first, and an agent that exits at once loses it).
//! - `fail-probe-from=N`: the probe of the N-th hand-over out (counted from 1 since the
//!   agent started) and of every later one fails, before any rule changes.
//! - `mute-heartbeats`: the agent sends no heartbeats at all (it still answers requests): its
//!   siblings suspect it while it is reachable.
//! - `reconnect-delay=MS`: after one of its outbound links ends, the agent waits MS ms before
//!   it tries to link up again.
//! - `panic-after=MS`: one of the agent's tasks panics MS ms after it started (a bug): the
//!   whole agent must end, not go on without that task.

use std::{collections::BTreeMap, time::Duration};

use tracing::warn;

/// The environment variable that lists the faults.
pub const ENV: &str = "REDIRECTOR_TEST_FAULTS";

/// The pauses a test can ask for.
const PAUSES: [&str; 4] = ["pause-after-export", "pause-before-rules", "pause-between-families", "pause-before-commit"];

/// Faults to inject; none by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    pub pauses: BTreeMap<&'static str, Duration>,
    pub drop_abort: bool,
    pub drop_sessions_frame: bool,
    pub delay_ack: Option<Duration>,
    pub delay_commit: Option<Duration>,
    pub fail_probe_from: Option<usize>,
    pub mute_heartbeats: bool,
    pub reconnect_delay: Option<Duration>,
    pub panic_after: Option<Duration>,
}

impl Faults {
    /// Parses a list like `drop-abort,delay-ack=2500`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut f = Self::default();
        let ms = |k: &str, v: Option<&str>| -> Result<Duration, String> { v.and_then(|v| v.parse().ok()).map(Duration::from_millis).ok_or_else(|| format!("{k} needs =MS")) };
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = item.split_once('=').map_or((item, None), |(k, v)| (k, Some(v)));
            if let Some(p) = PAUSES.iter().find(|p| **p == k) {
                f.pauses.insert(p, ms(k, v)?);
                continue;
            }
            match k {
                "drop-abort" => f.drop_abort = true,
                "drop-sessions-frame" => f.drop_sessions_frame = true,
                "delay-ack" => f.delay_ack = Some(ms(k, v)?),
                "delay-commit" => f.delay_commit = Some(ms(k, v)?),
                "fail-probe-from" => f.fail_probe_from = Some(v.and_then(|v| v.parse().ok()).filter(|n| *n > 0).ok_or("fail-probe-from needs =N (from 1)")?),
                "mute-heartbeats" => f.mute_heartbeats = true,
                "reconnect-delay" => f.reconnect_delay = Some(ms(k, v)?),
                "panic-after" => f.panic_after = Some(ms(k, v)?),
                other => return Err(format!("unknown fault {other:?}")),
            }
        }
        Ok(f)
    }

    /// The faults the environment asks for.
    pub fn from_env() -> Result<Self, String> {
        Self::from_setting(std::env::var(ENV).ok().as_deref(), cfg!(feature = "test-faults"))
    }

    /// The faults `setting` asks for, in a build that has them (`built_in`) or not.
    fn from_setting(setting: Option<&str>, built_in: bool) -> Result<Self, String> {
        match setting {
            None => Ok(Self::default()),
            Some(v) if built_in => Self::parse(v),
            Some(_) => Err("set, but this agent is built without test faults (they come with the cargo feature `test-faults`, which `cargo xtask test` builds); unset it".into()),
        }
    }

    #[must_use]
    pub fn any(&self) -> bool {
        *self != Self::default()
    }

    /// Waits at pause `name` if the test asked for it (`what`: the hand-over, for the log).
    pub async fn pause(&self, name: &str, what: &str) {
        if let Some(d) = self.pauses.get(name) {
            warn!(handoff = what, "TEST FAULT {name}: waiting {} ms", d.as_millis());
            tokio::time::sleep(*d).await;
        }
    }

    /// [`Faults::pause`] on a blocking thread.
    pub fn pause_blocking(&self, name: &str, what: &str) {
        if let Some(d) = self.pauses.get(name) {
            warn!(handoff = what, "TEST FAULT {name}: waiting {} ms", d.as_millis());
            std::thread::sleep(*d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        assert_eq!(Faults::parse("").unwrap(), Faults::default());
        let f = Faults::parse("drop-abort, pause-before-commit=1500,delay-ack=20,delay-commit=30,fail-probe-from=2,mute-heartbeats,reconnect-delay=5000,panic-after=9").unwrap();
        assert_eq!(f.panic_after, Some(Duration::from_millis(9)));
        assert!(f.drop_abort && !f.drop_sessions_frame && f.mute_heartbeats);
        assert_eq!(f.pauses.get("pause-before-commit"), Some(&Duration::from_millis(1500)));
        assert_eq!(f.delay_ack, Some(Duration::from_millis(20)));
        assert_eq!(f.delay_commit, Some(Duration::from_millis(30)));
        assert_eq!((f.fail_probe_from, f.reconnect_delay), (Some(2), Some(Duration::from_secs(5))));
        for p in PAUSES {
            assert!(Faults::parse(&format!("{p}=7")).unwrap().pauses.contains_key(p));
        }
        assert!(Faults::parse("delay-ack").is_err());
        assert!(Faults::parse("fail-probe-from=0").is_err());
        assert!(Faults::parse("drop-everything").is_err());
    }

    #[test]
    fn only_a_test_build_reads_faults() {
        assert_eq!(Faults::from_setting(None, false), Ok(Faults::default()));
        assert!(Faults::from_setting(Some("drop-abort"), true).unwrap().drop_abort);
        let e = Faults::from_setting(Some("drop-abort"), false).unwrap_err();
        assert!(e.contains("built without test faults"), "{e}");
        assert!(Faults::from_setting(Some(""), false).is_err(), "even an empty list: the variable says a test meant this agent");
    }
}
