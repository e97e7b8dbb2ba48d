//! Rule test cases in the spec's format (`expected` as stage → ids or flat id
//! lists, `expected_timeouts`, `expected_error`), and a readable diff.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};

use std::sync::Arc;

use cepheid_rules::parse_rule_value;
use cepheid_types::MatchKind;
use serde_json::Value as Json;

use crate::engine::{Engine, EngineConfig, ManualClock, Output, SourceConfig};

/// One case file.
#[derive(Clone, Debug)]
pub struct TestCase {
    pub name: String,
    pub file: PathBuf,
    pub rule: Json,
    pub events: Vec<Json>,
    pub expected: Option<Vec<Json>>,
    pub expected_timeouts: Option<Vec<Json>>,
    pub expected_error: Option<String>,
}

/// A match as the case format compares it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shape {
    Map(BTreeMap<String, Vec<String>>),
    Flat(Vec<String>),
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shape::Flat(v) => write!(f, "[{}]", v.join(", ")),
            Shape::Map(m) => {
                write!(f, "{{")?;
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{k}: [{}]", v.join(", "))?;
                }
                write!(f, "}}")
            }
        }
    }
}

/// Outcome of one case.
#[derive(Clone, Debug)]
pub struct CaseOutcome {
    pub name: String,
    pub file: PathBuf,
    /// Empty when the case passed.
    pub failures: Vec<String>,
}

impl CaseOutcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("{file}: cannot read: {source}")]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{file}: not a test case: {msg}")]
    Format { file: PathBuf, msg: String },
}

impl TestCase {
    pub fn load(file: &FsPath) -> Result<TestCase, CaseError> {
        let text = std::fs::read_to_string(file).map_err(|e| CaseError::Io { file: file.into(), source: e })?;
        let fmt = |msg: String| CaseError::Format { file: file.into(), msg };
        let doc: Json = serde_json::from_str(&text).map_err(|e| fmt(format!("{e}")))?;
        let obj = doc.as_object().ok_or_else(|| fmt("expected a JSON object".into()))?;
        for k in obj.keys() {
            if !["name", "origin", "rule", "events", "expected", "expected_timeouts", "expected_error"].contains(&k.as_str()) {
                return Err(fmt(format!("unknown key `{k}`")));
            }
        }
        let list = |k: &str| -> Result<Option<Vec<Json>>, CaseError> {
            match obj.get(k) {
                None => Ok(None),
                Some(Json::Array(a)) => Ok(Some(a.clone())),
                Some(_) => Err(fmt(format!("`{k}` must be an array"))),
            }
        };
        Ok(TestCase {
            name: obj
                .get("name")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| file.file_stem().unwrap_or_default().to_string_lossy().into()),
            file: file.into(),
            rule: match obj.get("rule") {
                // A path (relative to the case file) to a rule file, JSON or YAML.
                Some(Json::String(path)) => {
                    let rf = file.parent().unwrap_or(FsPath::new(".")).join(path);
                    let text = std::fs::read_to_string(&rf)
                        .map_err(|e| fmt(format!("cannot read rule file {}: {e}", rf.display())))?;
                    let yaml = rf.extension().is_some_and(|x| x == "yaml" || x == "yml");
                    if yaml {
                        serde_yaml::from_str(&text).map_err(|e| fmt(format!("rule file {}: {e}", rf.display())))?
                    } else {
                        serde_json::from_str(&text).map_err(|e| fmt(format!("rule file {}: {e}", rf.display())))?
                    }
                }
                Some(v) => v.clone(),
                None => return Err(fmt("missing `rule`".into())),
            },
            events: list("events")?.unwrap_or_default(),
            expected: list("expected")?,
            expected_timeouts: list("expected_timeouts")?,
            expected_error: obj.get("expected_error").and_then(|v| v.as_str()).map(str::to_string),
        })
    }

    /// Runs the case through the engine: events in order on one source with
    /// time field `event_time` and no out-of-orderness (so the watermark is
    /// each event's time), then +∞.
    pub fn run(&self) -> CaseOutcome {
        let mut failures = Vec::new();
        let spec = match parse_rule_value(&self.rule) {
            Ok(s) => Some(s),
            Err(d) => {
                self.check_error(Err(d.to_string()), &mut failures);
                None
            }
        };
        if let Some(spec) = spec {
            let cfg = EngineConfig { default_source: SourceConfig { time_field: "event_time".into(), out_of_orderness_ms: 0 }, ..EngineConfig::default() };
            let mut engine = Engine::new(cfg, Arc::new(ManualClock::new(0)));
            match engine.upsert_rule(&spec) {
                Err(e) => self.check_error(Err(e.to_string()), &mut failures),
                Ok(_) if self.expected_error.is_some() => self.check_error(Ok(()), &mut failures),
                Ok(_) => {
                    let mut out = Vec::new();
                    let source = spec.source.clone().unwrap_or_else(|| "test".into());
                    for (i, ev) in self.events.iter().enumerate() {
                        match engine.decode(&source, &ev.to_string()) {
                            Ok(e) => engine.push(&source, e, &mut out),
                            Err(err) => failures.push(format!("event #{}: {err}", i + 1)),
                        }
                    }
                    engine.finish(&mut out);
                    let mut matches = Vec::new();
                    let mut timeouts = Vec::new();
                    for o in out {
                        match o {
                            Output::Match(r) => {
                                let named: Vec<(String, Vec<String>)> = r
                                    .stages
                                    .iter()
                                    .map(|(name, evs)| (name.clone(), evs.iter().map(|e| event_id(e.get())).collect()))
                                    .collect();
                                match r.kind {
                                    MatchKind::Match => matches.push(named),
                                    MatchKind::Timeout => timeouts.push(named),
                                }
                            }
                            Output::Late { event, .. } => failures.push(format!("event reported late: {}", event.raw())),
                            // Events without the rule's key fields are not seen by the rule.
                            Output::MissingKey { .. } => {}
                        }
                    }
                    if let Some(exp) = &self.expected {
                        compare("matches", exp, &matches, &mut failures);
                    }
                    if let Some(exp) = &self.expected_timeouts {
                        compare("timeouts", exp, &timeouts, &mut failures);
                    }
                }
            }
        }
        CaseOutcome { name: self.name.clone(), file: self.file.clone(), failures }
    }

    fn check_error(&self, result: Result<(), String>, failures: &mut Vec<String>) {
        match (&self.expected_error, result) {
            (Some(want), Err(text)) => {
                if !text.contains(want.as_str()) {
                    failures.push(format!("rule refused, but no message contains {want:?}:\n{text}"));
                }
            }
            (Some(want), Ok(())) => failures.push(format!("rule accepted, but an error containing {want:?} was expected")),
            (None, Err(text)) => failures.push(format!("rule refused:\n{text}")),
            (None, Ok(())) => {}
        }
    }
}

/// The `id` of an event as received (its whole text when it has none).
fn event_id(raw: &str) -> String {
    match serde_json::from_str::<Json>(raw) {
        Ok(Json::Object(o)) => match o.get("id") {
            Some(Json::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => raw.to_string(),
        },
        _ => raw.to_string(),
    }
}

fn to_shape(j: &Json) -> Option<Shape> {
    let id = |v: &Json| match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    };
    match j {
        Json::Array(a) => Some(Shape::Flat(a.iter().map(id).collect())),
        Json::Object(o) => Some(Shape::Map(
            o.iter()
                .filter_map(|(k, v)| {
                    let ids: Vec<String> = v.as_array()?.iter().map(id).collect();
                    (!ids.is_empty()).then(|| (k.clone(), ids))
                })
                .collect(),
        )),
        _ => None,
    }
}

fn compare(what: &str, expected: &[Json], actual: &[Vec<(String, Vec<String>)>], failures: &mut Vec<String>) {
    let mut exp: Vec<Shape> = Vec::new();
    for e in expected {
        match to_shape(e) {
            Some(s) => exp.push(s),
            None => {
                failures.push(format!("expected {what}: entry {e} is neither a list of ids nor a stage → ids object"));
                return;
            }
        }
    }
    let flat = !exp.is_empty() && exp.iter().all(|s| matches!(s, Shape::Flat(_)));
    let mut act: Vec<Shape> = actual
        .iter()
        .map(|m| {
            if flat {
                Shape::Flat(m.iter().flat_map(|(_, ids)| ids.clone()).collect())
            } else {
                Shape::Map(m.iter().filter(|(_, ids)| !ids.is_empty()).cloned().collect())
            }
        })
        .collect();
    if flat {
        // Flat form compares either layout of a mixed list by the map form too.
    } else {
        exp = exp
            .into_iter()
            .map(|s| match s {
                Shape::Flat(v) => Shape::Flat(v),
                m => m,
            })
            .collect();
    }
    exp.sort();
    act.sort();
    let mut missing = Vec::new();
    let mut unexpected = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < exp.len() || j < act.len() {
        match (exp.get(i), act.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                missing.push(a.to_string());
                i += 1;
            }
            (Some(_), Some(b)) => {
                unexpected.push(b.to_string());
                j += 1;
            }
            (Some(a), None) => {
                missing.push(a.to_string());
                i += 1;
            }
            (None, Some(b)) => {
                unexpected.push(b.to_string());
                j += 1;
            }
            (None, None) => break,
        }
    }
    if !missing.is_empty() || !unexpected.is_empty() {
        let mut s = format!("{what}: expected {}, got {}", exp.len(), act.len());
        for m in missing {
            s.push_str(&format!("\n  missing     {m}"));
        }
        for u in unexpected {
            s.push_str(&format!("\n  unexpected  {u}"));
        }
        failures.push(s);
    }
}

/// Case files under the given paths (a directory means every `*.json` in it, sorted).
pub fn collect_case_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, CaseError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| CaseError::Io { file: p.clone(), source: e })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "json"))
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}
