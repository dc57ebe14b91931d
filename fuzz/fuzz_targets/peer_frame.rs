//! Peer frames as a sibling (or anyone past TLS) sends them: decoding never panics, and what
//! decodes encodes back to a frame that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redirector::peer::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        let again = Frame::decode(&f.frame()).expect("an encoded frame decodes");
        assert_eq!(again, f);
    }
});
