//! Message rendering with minijinja. Templates were checked when the rule
//! was validated; rendering still cannot fail the delivery: an error renders
//! as a plain description of the match, with the error appended.

use std::collections::HashMap;
use std::sync::Mutex;

use cepheid_types::MatchRecord;
use serde_json::{json, Map, Value};

/// The values a template sees.
pub fn context(record: &MatchRecord, rule_name: &str, enrichments: &Map<String, Value>) -> Value {
    let mut stages = Map::new();
    for (name, events) in &record.stages {
        let evs: Vec<Value> = events.iter().map(|e| serde_json::from_str(e.get()).unwrap_or(Value::Null)).collect();
        stages.insert(name.clone(), Value::Array(evs));
    }
    let mut ctx = Map::new();
    ctx.insert("rule".into(), json!({"id": record.rule_id, "version": record.rule_version, "name": rule_name}));
    ctx.insert("key".into(), Value::Object(record.key.clone()));
    ctx.insert("kind".into(), json!(record.kind));
    ctx.insert("match_id".into(), json!(record.match_id));
    ctx.insert("first_event_time".into(), json!(record.first_event_time));
    ctx.insert("last_event_time".into(), json!(record.last_event_time));
    ctx.insert("detected_at".into(), json!(record.detected_at));
    for (k, v) in &stages {
        ctx.insert(k.clone(), v.clone());
    }
    ctx.insert("stages".into(), Value::Object(stages));
    for (k, v) in enrichments {
        ctx.insert(k.clone(), v.clone());
    }
    Value::Object(ctx)
}

/// The message when a rule has no template.
pub fn default_message(record: &MatchRecord, rule_name: &str) -> String {
    let key = serde_json::to_string(&record.key).unwrap_or_default();
    format!("[{rule_name}] {} for key {key} (match {})", if record.kind == cepheid_types::MatchKind::Match { "match" } else { "timeout" }, record.match_id)
}

/// Compiled templates, cached by their source.
pub struct Templates {
    env: Mutex<minijinja::Environment<'static>>,
    names: Mutex<HashMap<String, String>>,
}

impl Default for Templates {
    fn default() -> Self {
        // `new()`, not `default()`: the built-in filters and tests (`length`, `upper`, …).
        Templates { env: Mutex::new(minijinja::Environment::new()), names: Mutex::new(HashMap::new()) }
    }
}

impl Templates {
    pub fn render(&self, source: &str, ctx: &Value) -> Result<String, String> {
        let name = {
            let mut names = self.names.lock().unwrap();
            if let Some(n) = names.get(source) {
                n.clone()
            } else {
                let n = format!("t{}", names.len());
                self.env.lock().unwrap().add_template_owned(n.clone(), source.to_string()).map_err(|e| e.to_string())?;
                names.insert(source.to_string(), n.clone());
                n
            }
        };
        let env = self.env.lock().unwrap();
        let t = env.get_template(&name).map_err(|e| e.to_string())?;
        t.render(ctx).map_err(|e| e.to_string())
    }
}
