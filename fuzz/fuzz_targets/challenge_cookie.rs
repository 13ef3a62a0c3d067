#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringway_fuzz::challenge_cookie(data));
