#![no_main]
//! See the harness: `coordinator::fuzzing::http_head`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coordinator::fuzzing::http_head(data));
