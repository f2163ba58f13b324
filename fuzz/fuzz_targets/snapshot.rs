//! A policy loaded by the proxy and compiled into its routing snapshot, then rebuilt over it.
//! Input format and invariants: `outrider_proxy::fuzzing::snapshot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outrider_proxy::fuzzing::snapshot(data));
