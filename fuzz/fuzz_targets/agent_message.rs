#![no_main]
//! See the harness: `coordinator::fuzzing::agent_message`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| coordinator::fuzzing::agent_message(data));
