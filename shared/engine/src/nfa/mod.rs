//! The automaton: compilation (`compile`), the shared buffer, Dewey numbers,
//! a `java.util.PriorityQueue`-exact heap, and the per-key runtime (`run`).

pub mod buffer;
pub mod compile;
pub mod dewey;
pub mod model;
pub mod pq;
pub mod run;

pub use compile::build_nfa;
pub use model::Nfa;
pub use run::{CondCache, NfaOutput, NfaState};
