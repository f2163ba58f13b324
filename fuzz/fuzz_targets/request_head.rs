//! An HTTP/1.1 request head through the proxy's request checks and header rewriting.
//! Input format and invariants: `outrider_proxy::fuzzing::request_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outrider_proxy::fuzzing::request_head(data));
