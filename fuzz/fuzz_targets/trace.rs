//! Trace context headers (traceparent, tracestate, B3) extracted and forwarded.
//! Input format and invariants: `outrider_proxy::fuzzing::trace`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outrider_proxy::fuzzing::trace(data));
