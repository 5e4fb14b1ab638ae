#![no_main]
//! See the harness: `coordinator::fuzzing::purge_pattern`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coordinator::fuzzing::purge_pattern(data));
