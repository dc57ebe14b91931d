//! Faults a test can inject into an agent (environment variable `REDIRECTOR_TEST_FAULTS`, a
//! comma-separated list), to reach the hand-over's failure paths with real processes. Never
//! set in production: the agent warns at start when any is.
//!
//! - `pause-before-commit=MS`: the origin waits MS ms after installing a hand-over's rules
//!   (its commit point) before telling anyone it committed.
//! - `drop-abort`: the origin never sends `Abort` to a volunteer (as if every one were lost).
//! - `drop-sessions-frame`: the origin leaves out the first `Sessions` frame that carries
//!   sessions (as if a link flap lost it).
//! - `delay-ack=MS`: the volunteer waits MS ms after a transfer is ready before acknowledging.

use std::time::Duration;

/// The environment variable that lists the faults.
pub const ENV: &str = "REDIRECTOR_TEST_FAULTS";

/// Faults to inject; none by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    pub pause_before_commit: Option<Duration>,
    pub drop_abort: bool,
    pub drop_sessions_frame: bool,
    pub delay_ack: Option<Duration>,
}

impl Faults {
    /// Parses a list like `drop-abort,delay-ack=2500`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut f = Self::default();
        let ms = |k: &str, v: Option<&str>| -> Result<Duration, String> { v.and_then(|v| v.parse().ok()).map(Duration::from_millis).ok_or_else(|| format!("{k} needs =MS")) };
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = item.split_once('=').map_or((item, None), |(k, v)| (k, Some(v)));
            match k {
                "pause-before-commit" => f.pause_before_commit = Some(ms(k, v)?),
                "drop-abort" => f.drop_abort = true,
                "drop-sessions-frame" => f.drop_sessions_frame = true,
                "delay-ack" => f.delay_ack = Some(ms(k, v)?),
                other => return Err(format!("unknown fault {other:?}")),
            }
        }
        Ok(f)
    }

    /// The faults the environment asks for.
    pub fn from_env() -> Result<Self, String> {
        std::env::var(ENV).map_or_else(|_| Ok(Self::default()), |v| Self::parse(&v))
    }

    #[must_use]
    pub fn any(&self) -> bool {
        *self != Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        assert_eq!(Faults::parse("").unwrap(), Faults::default());
        let f = Faults::parse("drop-abort, pause-before-commit=1500,delay-ack=20").unwrap();
        assert!(f.drop_abort && !f.drop_sessions_frame);
        assert_eq!(f.pause_before_commit, Some(Duration::from_millis(1500)));
        assert_eq!(f.delay_ack, Some(Duration::from_millis(20)));
        assert!(Faults::parse("delay-ack").is_err());
        assert!(Faults::parse("drop-everything").is_err());
    }
}
