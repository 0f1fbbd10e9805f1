//! Property-based fuzzing (proptest) of every parser that reads untrusted
//! input; the targets are in `tests/fuzz.rs`, this library is empty.
//!
//! Why proptest and not cargo-fuzz: cargo-fuzz needs a nightly toolchain
//! (and bolero a fuzzing engine) for real coverage-guided fuzzing; the
//! project builds on stable. Proptest's random generation, with inputs
//! shaped like the real ones (mutated valid tokens, near-miss amounts,
//! mutated job JSON) beside plain garbage, runs in the normal test command.
//!
//! `deploy/local/test` runs each target `BETTING_FUZZ_CASES` times (default
//! 5,000: about a second); RELIABILITY.md ("Fuzzing") has the long run's
//! command and figures.

#![forbid(unsafe_code)]
