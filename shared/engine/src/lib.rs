//! Cepheid's matching engine.
//!
//! - [`nfa`]: one rule's automaton, compiled from a [`cepheid_rules::CompiledRule`]
//!   exactly as Apache Flink CEP compiles a `Pattern`, and run per key with
//!   Flink's semantics (Dewey-versioned shared buffer, after-match skip with
//!   Flink's heap tie order, windows, timeouts) plus Cepheid's extensions
//!   (trailing absence fired by time, unordered `all` stages, stage windows
//!   always enforced).
//! - [`testcase`]: rule test cases in the spec's format, as used by
//!   `cepheid test` and the conformance suites.

pub mod cell;
pub mod cellcodec;
pub mod engine;
pub mod index;
pub mod key;
pub mod nfa;
pub mod snapshot;
pub mod testcase;
