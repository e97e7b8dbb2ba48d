//! Events: decoded once into field slots, raw JSON text kept for output.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::fields::{FieldId, FieldRegistry};
use crate::value::Value;
use crate::Millis;

/// One input event. Cheap to clone (shared).
#[derive(Clone)]
pub struct Event(Arc<EventInner>);

struct EventInner {
    time: Millis,
    slots: Box<[Value]>,
    raw: Box<str>,
}

impl Event {
    /// Builds an event directly (tests, generators).
    pub fn new(time: Millis, slots: Vec<Value>, raw: impl Into<Box<str>>) -> Event {
        Event(Arc::new(EventInner { time, slots: slots.into_boxed_slice(), raw: raw.into() }))
    }

    /// Event time in milliseconds, as read from the source's time field.
    pub fn time(&self) -> Millis {
        self.0.time
    }

    /// The value in a field slot; NULL when the event lacks the field.
    #[inline]
    pub fn get(&self, id: FieldId) -> &Value {
        static NULL: Value = Value::Null;
        self.0.slots.get(id as usize).unwrap_or(&NULL)
    }

    /// Number of slots decoded (the registry size at decode time).
    pub fn slot_count(&self) -> usize {
        self.0.slots.len()
    }

    /// The event as received.
    pub fn raw(&self) -> &str {
        &self.0.raw
    }

    /// The event as a JSON value (parsed from the raw text).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.0.raw).unwrap_or(serde_json::Value::Null)
    }

    /// Same allocation?
    pub fn ptr_eq(&self, other: &Event) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Event(t={}, {})", self.0.time, self.0.raw)
    }
}

/// Why a line could not become an event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("missing time field `{0}`")]
    MissingTime(String),
    #[error("time field `{field}` is not an integer number of milliseconds: {value}")]
    BadTime { field: String, value: String },
}

/// Decodes JSON text into [`Event`]s against a [`FieldRegistry`]: only the
/// registered fields are materialised, everything else is skipped unparsed.
pub struct EventDecoder<'r> {
    registry: &'r FieldRegistry,
    time_field: FieldId,
}

impl<'r> EventDecoder<'r> {
    /// `time_field` must be registered in `registry`.
    pub fn new(registry: &'r FieldRegistry, time_field: FieldId) -> Self {
        EventDecoder { registry, time_field }
    }

    pub fn decode(&self, text: &str) -> Result<Event, DecodeError> {
        self.decode_owned(text.trim().to_string())
    }

    /// Decodes the fields of a line whose time is already known (restores).
    pub fn decode_with_time(&self, text: &str, time: Millis) -> Result<Event, DecodeError> {
        let mut slots = vec![Value::Null; self.registry.len()];
        let mut de = serde_json::Deserializer::from_str(text);
        ObjectSeed { registry: self.registry, prefix: String::new(), slots: &mut slots }
            .deserialize(&mut de)
            .map_err(|e| DecodeError::NotJson(e.to_string()))?;
        Ok(Event::new(time, slots, text.trim()))
    }

    /// [`EventDecoder::decode_with_time`] of a line it may keep as the event's text (no copy).
    pub fn decode_owned_with_time(&self, mut text: String, time: Millis) -> Result<Event, DecodeError> {
        let mut slots = vec![Value::Null; self.registry.len()];
        let mut de = serde_json::Deserializer::from_str(&text);
        ObjectSeed { registry: self.registry, prefix: String::new(), slots: &mut slots }
            .deserialize(&mut de)
            .map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let trimmed = text.trim();
        if trimmed.len() != text.len() {
            text = trimmed.to_string();
        }
        Ok(Event::new(time, slots, text.into_boxed_str()))
    }

    /// Decodes a line it may keep as the event's text (no copy).
    pub fn decode_owned(&self, mut text: String) -> Result<Event, DecodeError> {
        let trimmed = text.trim();
        if trimmed.len() != text.len() {
            text = trimmed.to_string();
        }
        let mut slots = vec![Value::Null; self.registry.len()];
        let mut de = serde_json::Deserializer::from_str(&text);
        ObjectSeed { registry: self.registry, prefix: String::new(), slots: &mut slots }
            .deserialize(&mut de)
            .map_err(|e| DecodeError::NotJson(e.to_string()))?;
        de.end().map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let field = self.registry.path(self.time_field);
        let time = match &slots[self.time_field as usize] {
            Value::Int(i) => *i,
            Value::Float(f) if f.fract() == 0.0 => *f as i64,
            Value::Null => return Err(DecodeError::MissingTime(field.to_string())),
            other => {
                return Err(DecodeError::BadTime { field: field.to_string(), value: other.to_string() })
            }
        };
        Ok(Event::new(time, slots, text.into_boxed_str()))
    }

    /// Decodes an already parsed JSON object (test cases).
    pub fn decode_value(&self, v: &serde_json::Value) -> Result<Event, DecodeError> {
        self.decode(&v.to_string())
    }
}

struct ObjectSeed<'a> {
    registry: &'a FieldRegistry,
    prefix: String,
    slots: &'a mut Vec<Value>,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut path = self.prefix;
        let base = path.len();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let full: &str = if base == 0 {
                &key
            } else {
                path.truncate(base);
                path.push('.');
                path.push_str(&key);
                &path
            };
            let id = self.registry.get(full);
            if self.registry.is_prefix(full) {
                let full = full.to_string();
                let v: serde_json::Value = map.next_value()?;
                fill_nested(self.registry, &full, &v, self.slots);
                if let Some(id) = id {
                    self.slots[id as usize] = Value::from_json(&v);
                }
            } else if let Some(id) = id {
                self.slots[id as usize] = map.next_value_seed(ScalarSeed)?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// An object key, borrowed from the text when it has no escapes (serde's own
/// `Cow<str>` always copies: one allocation per field of every event).
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = std::borrow::Cow<'de, str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = std::borrow::Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v))
    }
}

/// Deserializes a JSON value straight into a [`Value`] (no intermediate tree
/// for scalars; objects and arrays become their JSON text).
struct ScalarSeed;

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map(Value::Int).unwrap_or(Value::Float(v as f64)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        let v = serde_json::Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Value::from_json(&v))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        let v = serde_json::Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Value::from_json(&v))
    }
}

fn fill_nested(registry: &FieldRegistry, prefix: &str, v: &serde_json::Value, slots: &mut [Value]) {
    if let serde_json::Value::Object(m) = v {
        for (k, v) in m {
            let path = format!("{prefix}.{k}");
            if let Some(id) = registry.get(&path) {
                slots[id as usize] = Value::from_json(v);
            }
            if registry.is_prefix(&path) {
                fill_nested(registry, &path, v, slots);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_registered_fields() {
        let mut reg = FieldRegistry::new();
        let t = reg.intern("eventTime");
        let p = reg.intern("price");
        let sku = reg.intern("payload.sku");
        let dec = EventDecoder::new(&reg, t);
        let e = dec
            .decode(r#"{"eventTime": 5, "price": 1.5, "other": [1,2], "payload": {"sku": "x"}}"#)
            .unwrap();
        assert_eq!(e.time(), 5);
        assert_eq!(e.get(p), &Value::Float(1.5));
        assert_eq!(e.get(sku), &Value::str("x"));
        assert!(matches!(dec.decode("{}"), Err(DecodeError::MissingTime(_))));
        assert!(matches!(dec.decode("nope"), Err(DecodeError::NotJson(_))));
        assert!(matches!(dec.decode(r#"{"eventTime":"x"}"#), Err(DecodeError::BadTime { .. })));
        // A key with an escape is read (owned) like any other.
        let e = dec.decode(r#"{"event\u0054ime": 7, "pr\u0069ce": 2}"#).unwrap();
        assert_eq!((e.time(), e.get(p)), (7, &Value::Int(2)));
        let e = dec.decode_owned_with_time(" {\"price\": 3} ".to_string(), 9).unwrap();
        assert_eq!((e.time(), e.get(p), e.raw()), (9, &Value::Int(3), r#"{"price": 3}"#));
    }
}
