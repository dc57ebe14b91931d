//! Lines an application sends on the hook: the register line, answers, line heads, and export
//! answers checked against a request (both versions). None may panic.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use redirector_hook::{Answer, Version, frame::Head, register::Register};

fuzz_target!(|data: &[u8]| {
    let _ = Register::parse(data);
    let _ = Answer::parse(data);
    let _ = Head::parse(data);
    let requested: [IpAddr; 3] = [IpAddr::from([198, 18, 1, 5]), IpAddr::from([198, 18, 1, 6]), "2001:db8::5".parse().expect("address")];
    for version in [Version::V1, Version::V2, Version::V3] {
        let _ = redirector::app::check_export(data, version, &requested, 1 << 16);
    }
});
