//! Configuration files: reading and checking one never panics, whatever it says.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(cfg) = toml::from_str::<redirector::config::Config>(text)
    {
        let _ = cfg.validate();
    }
});
