//! The match record: the spec's output format.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use xxhash_rust::xxh3::Xxh3;

use crate::Millis;

/// `"match"` or `"timeout"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchKind {
    Match,
    Timeout,
}

/// One detected match (or expired partial match) as emitted downstream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MatchRecord {
    pub rule_id: String,
    pub rule_version: u64,
    pub kind: MatchKind,
    /// `{field: value}` of the rule's `key_by`, `{}` without a key.
    pub key: serde_json::Map<String, serde_json::Value>,
    pub match_id: String,
    pub first_event_time: Millis,
    pub last_event_time: Millis,
    pub detected_at: Millis,
    /// Stage name → the events it took, as received, oldest first.
    pub stages: Vec<(String, Vec<Box<RawValue>>)>,
}


impl MatchRecord {
    /// One JSON line in the spec's format (stages as an object, in pattern order).
    pub fn to_json_line(&self) -> String {
        let mut s = String::with_capacity(256);
        s.push_str("{\"rule_id\":");
        s.push_str(&serde_json::to_string(&self.rule_id).unwrap());
        s.push_str(",\"rule_version\":");
        s.push_str(&self.rule_version.to_string());
        s.push_str(",\"kind\":");
        s.push_str(match self.kind {
            MatchKind::Match => "\"match\"",
            MatchKind::Timeout => "\"timeout\"",
        });
        s.push_str(",\"key\":");
        s.push_str(&serde_json::to_string(&self.key).unwrap());
        s.push_str(",\"match_id\":\"");
        s.push_str(&self.match_id);
        s.push_str("\",\"first_event_time\":");
        s.push_str(&self.first_event_time.to_string());
        s.push_str(",\"last_event_time\":");
        s.push_str(&self.last_event_time.to_string());
        s.push_str(",\"detected_at\":");
        s.push_str(&self.detected_at.to_string());
        s.push_str(",\"stages\":{");
        for (i, (name, events)) in self.stages.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&serde_json::to_string(name).unwrap());
            s.push_str(":[");
            for (j, e) in events.iter().enumerate() {
                if j > 0 {
                    s.push(',');
                }
                s.push_str(e.get());
            }
            s.push(']');
        }
        s.push_str("}}");
        s
    }

    /// Parses a line written by [`MatchRecord::to_json_line`].
    pub fn from_json_line(line: &str) -> Result<MatchRecord, serde_json::Error> {
        #[derive(Deserialize)]
        struct Wire {
            rule_id: String,
            rule_version: u64,
            kind: MatchKind,
            key: serde_json::Map<String, serde_json::Value>,
            match_id: String,
            first_event_time: Millis,
            last_event_time: Millis,
            detected_at: Millis,
            stages: serde_json::Map<String, serde_json::Value>,
        }
        let w: Wire = serde_json::from_str(line)?;
        let mut stages = Vec::new();
        for (k, v) in w.stages {
            let evs = match v {
                serde_json::Value::Array(a) => a
                    .into_iter()
                    .map(|e| RawValue::from_string(e.to_string()))
                    .collect::<Result<Vec<_>, _>>()?,
                _ => Vec::new(),
            };
            stages.push((k, evs));
        }
        Ok(MatchRecord {
            rule_id: w.rule_id,
            rule_version: w.rule_version,
            kind: w.kind,
            key: w.key,
            match_id: w.match_id,
            first_event_time: w.first_event_time,
            last_event_time: w.last_event_time,
            detected_at: w.detected_at,
            stages,
        })
    }
}

/// The spec's deterministic match id: the same rule, version, key, kind and
/// events (stage by stage) give the same id, wherever and whenever computed.
pub fn match_id<'a>(
    rule_id: &str,
    version: u64,
    kind: MatchKind,
    key_repr: &str,
    stages: impl Iterator<Item = (&'a str, &'a [&'a str])>,
) -> String {
    let mut h = Xxh3::new();
    h.update(rule_id.as_bytes());
    h.update(&[0]);
    h.update(&version.to_le_bytes());
    h.update(&[kind as u8]);
    h.update(key_repr.as_bytes());
    h.update(&[0]);
    for (stage, events) in stages {
        h.update(stage.as_bytes());
        h.update(&[1]);
        for e in events {
            h.update(e.as_bytes());
            h.update(&[2]);
        }
    }
    format!("{:032x}", h.digest128())
}
