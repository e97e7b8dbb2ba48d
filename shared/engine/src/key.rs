//! Partition keys: the values of a rule's `key_by` fields.

use std::hash::{Hash, Hasher};

use cepheid_types::{Event, FieldId, Value};
use smallvec::SmallVec;

/// Key values, hashable (integral floats equal the integer).
#[derive(Clone, Debug, Default)]
pub struct KeyVals(pub SmallVec<[Value; 2]>);

fn norm(v: &Value) -> (u8, u64, Option<&str>) {
    match v {
        Value::Null => (0, 0, None),
        Value::Bool(b) => (1, *b as u64, None),
        Value::Int(i) => (2, *i as u64, None),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => (2, *f as i64 as u64, None),
        Value::Float(f) => (3, f.to_bits(), None),
        Value::Str(s) => (4, 0, Some(s)),
    }
}

impl PartialEq for KeyVals {
    fn eq(&self, o: &Self) -> bool {
        self.0.len() == o.0.len() && self.0.iter().zip(o.0.iter()).all(|(a, b)| norm(a) == norm(b))
    }
}
impl Eq for KeyVals {}

impl Hash for KeyVals {
    fn hash<H: Hasher>(&self, h: &mut H) {
        for v in &self.0 {
            norm(v).hash(h);
        }
    }
}

impl PartialOrd for KeyVals {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for KeyVals {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        let a: Vec<_> = self.0.iter().map(norm).collect();
        let b: Vec<_> = o.0.iter().map(norm).collect();
        a.cmp(&b)
    }
}

impl KeyVals {
    /// An event's key for `fields`; `None` when one of them is missing (NULL):
    /// such an event is not seen by rules keyed by these fields.
    pub fn of(ev: &Event, fields: &[FieldId]) -> Option<KeyVals> {
        let mut key = KeyVals::default();
        for f in fields {
            let v = ev.get(*f);
            if v.is_null() {
                return None;
            }
            key.0.push(v.clone());
        }
        Some(key)
    }

    /// `{field: value}` for output.
    pub fn to_json(&self, names: &[String]) -> serde_json::Map<String, serde_json::Value> {
        names.iter().cloned().zip(self.0.iter().map(|v| v.to_json())).collect()
    }

    /// Stable text form (match ids, snapshots, logs).
    pub fn repr(&self) -> String {
        let mut s = String::new();
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                s.push('|');
            }
            v.key_repr(&mut s);
        }
        s
    }
}
