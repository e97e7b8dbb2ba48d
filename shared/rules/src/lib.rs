//! The rule language (`shared/spec/rule-dsl.md` is the contract).
//!
//! Rules are read from JSON or YAML into [`RuleSpec`] — the document as people
//! write it, checked key by key so that every structural error of a rule is
//! reported at once as a [`Diagnostic`] naming the rule, the stage, the key and,
//! for conditions, the line and column in the SQL text. [`compile`] turns a
//! spec into a [`CompiledRule`]: conditions parsed once by `sqlparser` into
//! [`Expr`] trees that read field slots by index and stage aggregates by slot,
//! never by name. The engine only ever sees compiled rules.

mod agg;
mod compile;
mod diag;
mod duration;
mod expr;
pub mod files;
mod spec;

pub use agg::{AggKind, AggSpec, AggState, SerValue};
pub use compile::{compile, AfterMatch, CompiledRule, CompiledStage, LeafStage, StageBody};
pub use diag::{Diagnostic, Diagnostics};
pub use duration::{format_duration, parse_duration};
pub use expr::{CmpOp, EvalCtx, Expr, Func, NoStages};
pub use spec::{
    parse_rule_json, parse_rule_str, parse_rule_value, ActionSpec, AfterMatchSpec, Contiguity,
    EnrichSpec, RuleFormat, RuleSpec, StageKindSpec, StageSpec, TimeMode, Times,
};
