#![no_main]
//! See the harness: `warmer::fuzzing::sitemap`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| warmer::fuzzing::sitemap(data));
