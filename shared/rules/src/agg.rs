//! Stage aggregates, maintained incrementally per partial match.
//!
//! `stage.f` is `LAST(stage.f)`. Each distinct aggregate a rule uses gets a
//! slot; a partial match keeps one [`AggState`] per slot and updates the slots
//! of a stage when that stage takes an event, so conditions never walk the
//! events a partial match holds.

use cepheid_types::{Event, FieldId, Value};
use std::collections::VecDeque;

/// What is computed over a stage's events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AggKind {
    Count,
    Sum(FieldId),
    Avg(FieldId),
    Min(FieldId),
    Max(FieldId),
    First(FieldId),
    /// `LAST(stage.f, n)`: n back from the last (0 = the last).
    Last(FieldId, u32),
}

/// One aggregate slot of a rule: a leaf stage and what to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AggSpec {
    /// Index of the leaf stage (see `CompiledRule::leaves`).
    pub stage: u16,
    pub kind: AggKind,
}

/// Running state of one aggregate slot.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum AggState {
    Count(u64),
    /// Integer sum while every value is an integer, float after.
    Sum { int: i64, float: f64, is_float: bool, n: u64 },
    MinMax(Option<SerValue>),
    First(Option<SerValue>),
    /// The last `n + 1` values, newest at the back.
    Last { keep: u32, values: VecDeque<SerValue> },
}

/// A [`Value`] in a form serde can store (snapshots).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum SerValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl From<&Value> for SerValue {
    fn from(v: &Value) -> Self {
        match v {
            Value::Null => SerValue::Null,
            Value::Bool(b) => SerValue::Bool(*b),
            Value::Int(i) => SerValue::Int(*i),
            Value::Float(f) => SerValue::Float(*f),
            Value::Str(s) => SerValue::Str(s.to_string()),
        }
    }
}

impl From<&SerValue> for Value {
    fn from(v: &SerValue) -> Self {
        match v {
            SerValue::Null => Value::Null,
            SerValue::Bool(b) => Value::Bool(*b),
            SerValue::Int(i) => Value::Int(*i),
            SerValue::Float(f) => Value::Float(*f),
            SerValue::Str(s) => Value::str(s),
        }
    }
}

impl AggState {
    pub fn new(kind: AggKind) -> AggState {
        match kind {
            AggKind::Count => AggState::Count(0),
            AggKind::Sum(_) | AggKind::Avg(_) => AggState::Sum { int: 0, float: 0.0, is_float: false, n: 0 },
            AggKind::Min(_) | AggKind::Max(_) => AggState::MinMax(None),
            AggKind::First(_) => AggState::First(None),
            AggKind::Last(_, n) => AggState::Last { keep: n, values: VecDeque::new() },
        }
    }

    /// Folds one event taken by the aggregate's stage.
    pub fn update(&mut self, kind: AggKind, ev: &Event) {
        match (self, kind) {
            (AggState::Count(c), _) => *c += 1,
            (AggState::Sum { int, float, is_float, n }, AggKind::Sum(f) | AggKind::Avg(f)) => match ev.get(f) {
                Value::Int(i) => {
                    *n += 1;
                    *float += *i as f64;
                    match int.checked_add(*i) {
                        Some(s) => *int = s,
                        None => *is_float = true,
                    }
                }
                Value::Float(x) => {
                    *n += 1;
                    *float += x;
                    *is_float = true;
                }
                _ => {}
            },
            (AggState::MinMax(cur), AggKind::Min(f) | AggKind::Max(f)) => {
                let v = ev.get(f);
                if v.is_null() {
                    return;
                }
                let replace = match cur {
                    None => true,
                    Some(c) => {
                        let c = Value::from(&*c);
                        match v.sql_cmp(&c) {
                            Some(std::cmp::Ordering::Less) => matches!(kind, AggKind::Min(_)),
                            Some(std::cmp::Ordering::Greater) => matches!(kind, AggKind::Max(_)),
                            _ => false,
                        }
                    }
                };
                if replace {
                    *cur = Some(v.into());
                }
            }
            (AggState::First(cur), AggKind::First(f))
                if cur.is_none() => {
                    *cur = Some(ev.get(f).into());
                }
            (AggState::Last { keep, values }, AggKind::Last(f, _)) => {
                values.push_back(ev.get(f).into());
                while values.len() > *keep as usize + 1 {
                    values.pop_front();
                }
            }
            _ => {}
        }
    }

    /// The aggregate's current value (SQL: NULL over no events, COUNT 0).
    pub fn value(&self, kind: AggKind) -> Value {
        match self {
            AggState::Count(c) => Value::Int(*c as i64),
            AggState::Sum { int, float, is_float, n } => {
                if *n == 0 {
                    return Value::Null;
                }
                match kind {
                    AggKind::Avg(_) => Value::Float(*float / *n as f64),
                    _ if *is_float => Value::Float(*float),
                    _ => Value::Int(*int),
                }
            }
            AggState::MinMax(v) | AggState::First(v) => v.as_ref().map(Value::from).unwrap_or(Value::Null),
            AggState::Last { keep, values } => {
                if values.len() > *keep as usize {
                    Value::from(&values[values.len() - 1 - *keep as usize])
                } else {
                    Value::Null
                }
            }
        }
    }
}
