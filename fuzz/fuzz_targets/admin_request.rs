//! Request lines on the admin socket: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = redirector::admin::api::Request::parse(line);
    }
});
