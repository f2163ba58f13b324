//! An upstream's HTTP/1.1 response (head, then body) read by the upstream codec.
//! Input format and invariants: `outrider_proxy::fuzzing::response_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outrider_proxy::fuzzing::response_head(data));
