//! Leaf types of Cepheid: the values conditions compute with, events as the
//! engine sees them (decoded once into field slots, raw text kept for output),
//! the field registry that maps field paths to slots, watermarks, and the match
//! record every stage of the pipeline emits.
//!
//! Nothing here knows about rules or automata; every other crate depends on it.

mod clock;
mod event;
mod fields;
mod record;
mod value;

pub use clock::{Clock, ManualClock, SystemClock};
pub use event::{DecodeError, Event, EventDecoder};
pub use fields::{FieldId, FieldRegistry};
pub use record::{match_id, MatchKind, MatchRecord};
pub use value::Value;

/// Milliseconds since the Unix epoch (event time or processing time).
pub type Millis = i64;

/// A watermark in the spec's sense: no event with time `< W` follows.
/// (Flink's watermark is one less.)
pub type Watermark = i64;
