//! The packet decisions the kernel programs share with user space (`redirector-common`), on
//! arbitrary header bytes: none panics, and the MSS found is inside the options given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redirector_common::{
    RuleValue,
    decide::{self, OPTS_BUF},
};

fuzz_target!(|data: &[u8]| {
    let mut opts = [0u8; OPTS_BUF];
    let n = data.len().min(OPTS_BUF);
    opts[..n].copy_from_slice(&data[..n]);
    let len = data.first().map_or(0, |b| usize::from(*b));
    if let Some((at, _)) = decide::find_mss(&opts, len) {
        assert!(at + 4 <= len.min(40), "an MSS option inside the options: at {at}, len {len}");
    }
    let mut h = [0u8; 20];
    let m = data.len().min(20);
    h[..m].copy_from_slice(&data[..m]);
    let _ = decide::ipv4_header_checksum(&h);
    let word = |i: usize| data.get(i..i + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let rule = RuleValue { target: [0; 16], drain_until_ns: word(0), since_unix: 0 };
    let _ = decide::migrated_step(data.get(8).copied().unwrap_or(0), &rule, word(9));
    let _ = decide::drain_state(&rule, word(9));
    let mut a = [0u8; 16];
    let k = data.len().min(16);
    a[..k].copy_from_slice(&data[..k]);
    let _ = decide::never_a_client(&a);
});
