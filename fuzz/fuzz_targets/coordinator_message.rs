#![no_main]
//! See the harness: `edge_agent::fuzzing::coordinator_message`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| edge_agent::fuzzing::coordinator_message(data));
