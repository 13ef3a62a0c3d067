//! Fuzz targets for the parsers Ringway runs on untrusted bytes, as plain functions that panic
//! when a property fails. `fuzz/` wraps each in a libFuzzer harness (`fuzz/run.sh`, cargo-fuzz
//! on the stable toolchain), and `tests/corpus.rs` replays the committed corpus through them
//! in the test suite, so every input that ever found a bug stays a regression test.
//!
//! Each target checks more than "does not panic": the request and response head targets check
//! that incremental scanning agrees with one pass, that the scanner's limits and the parser's
//! agree, and that what the proxy writes on parses back to the same message; the chunked
//! target decodes in random pieces and after re-encoding; the path normaliser is compared
//! with an independent reference implementation.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod heads;
mod paths;
mod small;
mod spool;

pub use heads::{request_head, response_head};
pub use paths::{host, path, reference_normalize_path};
pub use small::{challenge_cookie, chunked, proxy_protocol, spool_frames};

/// A fuzz target: panics when a property fails.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory and harness.
pub const TARGETS: &[(&str, Target)] = &[
    ("request_head", request_head),
    ("response_head", response_head),
    ("chunked", chunked),
    ("proxy_protocol", proxy_protocol),
    ("host", host),
    ("path", path),
    ("spool_frames", spool_frames),
    ("challenge_cookie", challenge_cookie),
];

/// A tiny deterministic generator seeded by the input, for the split points and choices a
/// target makes (the fuzzer then explores them through the input bytes).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: &[u8]) -> Self {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for &b in seed {
            s = (s ^ u64::from(b)).wrapping_mul(0x1000_0000_01b3);
        }
        Rng(s | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `1..=max` (max at least 1).
    pub(crate) fn size(&mut self, max: usize) -> usize {
        1 + (self.next() % max.max(1) as u64) as usize
    }
}

/// Splits off the first byte as a seed for choices; the rest is the input.
pub(crate) fn seeded(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&s, rest)) => (s, rest),
        None => (0, data),
    }
}
