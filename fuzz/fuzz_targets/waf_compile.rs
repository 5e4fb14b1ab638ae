#![no_main]
//! See the harness: `coordinator::fuzzing::waf`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coordinator::fuzzing::waf(data));
