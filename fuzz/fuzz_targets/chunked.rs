//! A chunked response body read by the upstream codec's body state machine.
//! Input format and invariants: `outrider_proxy::fuzzing::chunked`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outrider_proxy::fuzzing::chunked(data));
