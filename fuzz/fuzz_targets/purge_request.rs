#![no_main]
//! See the harness: `coordinator::fuzzing::purge_request`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coordinator::fuzzing::purge_request(data));
