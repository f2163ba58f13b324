//! Policy documents through the control plane's path: parse, validate, merge, encode, reload.
//! Input format and invariants: `outrider_control::fuzzing::policy_merge`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outrider_control::fuzzing::policy_merge(data));
