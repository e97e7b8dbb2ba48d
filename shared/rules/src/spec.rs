//! Rule documents as people write them, read key by key from JSON or YAML.
//!
//! Reading never stops at the first problem: every unknown key, wrong type
//! and structural error of the rule is collected into [`Diagnostics`].

use serde_json::{Map, Value as Json};

use crate::diag::{Diagnostic, Diagnostics};
use crate::duration::parse_duration;

/// Relation of a stage to the previous one, or between repetitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Contiguity {
    /// Flink `next` / `consecutive()`.
    Strict,
    /// Flink `followedBy` / default between repetitions.
    #[default]
    Relaxed,
    /// Flink `followedByAny` / `allowCombinations()`.
    Any,
}

/// Repetition bounds; `max: None` is unbounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Times {
    pub min: u32,
    pub max: Option<u32>,
}

impl Times {
    pub const ONE: Times = Times { min: 1, max: Some(1) };
    pub fn is_one(&self) -> bool {
        *self == Times::ONE
    }
    pub fn is_unbounded(&self) -> bool {
        self.max.is_none()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TimeMode {
    #[default]
    Event,
    Processing,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum AfterMatchSpec {
    #[default]
    NoSkip,
    SkipToNext,
    SkipPastLastEvent,
    SkipToFirst(String),
    SkipToLast(String),
}

/// What a stage is made of.
#[derive(Clone, Debug, PartialEq)]
pub enum StageKindSpec {
    /// A plain stage with a `where` condition (TRUE when absent).
    Single { condition: Option<String> },
    /// `group`: a repeated sub-sequence.
    Group(Vec<StageSpec>),
    /// `all`: an unordered set of inner stages (each `name` + `where`).
    All(Vec<StageSpec>),
}

/// One stage of a pattern.
#[derive(Clone, Debug, PartialEq)]
pub struct StageSpec {
    pub name: String,
    pub kind: StageKindSpec,
    pub contiguity: Contiguity,
    pub negate: bool,
    /// As written; `times: [0, n]` is kept here as min 0 (see [`StageSpec::effective_times`]).
    pub times: Times,
    pub optional: bool,
    pub greedy: bool,
    pub inner: Contiguity,
    pub until: Option<String>,
    pub within: Option<i64>,
}

impl StageSpec {
    /// `(times, optional)` with `min: 0` folded into optional.
    pub fn effective_times(&self) -> (Times, bool) {
        if self.times.min == 0 {
            (Times { min: 1, max: self.times.max }, true)
        } else {
            (self.times, self.optional)
        }
    }
    /// Repeats (anything but exactly once)?
    pub fn is_looping(&self) -> bool {
        !self.effective_times().0.is_one()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EnrichSpec {
    pub lookup: String,
    pub key: String,
    pub alias: String,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct ActionSpec {
    pub targets: Vec<String>,
    pub delay: Option<i64>,
    pub enrich: Vec<EnrichSpec>,
    pub template: Option<String>,
    pub dedupe: Option<i64>,
}

/// A rule document, read and structurally checked.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleSpec {
    pub id: String,
    pub version: u64,
    pub name: String,
    pub enabled: bool,
    pub source: Option<String>,
    pub filter: Option<String>,
    pub key_by: Vec<String>,
    pub time: TimeMode,
    pub pattern: Vec<StageSpec>,
    pub within: Option<i64>,
    pub after_match: AfterMatchSpec,
    pub emit_timeouts: bool,
    pub action: Option<ActionSpec>,
    /// The document itself, as JSON (what is stored and shown back).
    pub document: Json,
}

/// Input format of a rule document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleFormat {
    Json,
    Yaml,
}

/// Parses a rule from text. Syntax errors carry the line and column.
pub fn parse_rule_str(text: &str, format: RuleFormat) -> Result<RuleSpec, Diagnostics> {
    let doc: Json = match format {
        RuleFormat::Json => serde_json::from_str(text).map_err(|e| {
            Diagnostics::one(
                Diagnostic::new("E001", format!("not valid JSON: {e}")).at(e.line() as u64, e.column() as u64),
            )
        })?,
        RuleFormat::Yaml => serde_yaml::from_str(text).map_err(|e| {
            let (l, c) = e.location().map(|l| (l.line() as u64, l.column() as u64)).unwrap_or((0, 0));
            Diagnostics::one(Diagnostic::new("E001", format!("not valid YAML: {e}")).at(l, c))
        })?,
    };
    parse_rule_value(&doc)
}

/// Parses a JSON rule document.
pub fn parse_rule_json(text: &str) -> Result<RuleSpec, Diagnostics> {
    parse_rule_str(text, RuleFormat::Json)
}

/// Reads a rule from an already parsed document.
pub fn parse_rule_value(doc: &Json) -> Result<RuleSpec, Diagnostics> {
    let mut r = Reader { diags: Vec::new() };
    let spec = r.rule(doc);
    let id = spec.as_ref().map(|s| s.id.clone()).or_else(|| {
        doc.get("id").and_then(|v| v.as_str()).map(str::to_string)
    });
    if r.diags.is_empty() {
        if let Some(s) = spec {
            return Ok(s);
        }
    }
    // Report condition errors together with the structural ones.
    if let Some(s) = &spec {
        let mut scratch = cepheid_types::FieldRegistry::new();
        if let Err(d) = crate::compile::compile(s, &mut scratch) {
            for x in d.0 {
                if !r.diags.contains(&x) {
                    r.diags.push(x);
                }
            }
        }
    }
    let d = Diagnostics(r.diags);
    Err(match id {
        Some(id) => d.with_rule(&id),
        None => d,
    })
}

struct Reader {
    diags: Vec<Diagnostic>,
}

const RULE_KEYS: &[&str] = &[
    "id", "version", "name", "enabled", "source", "filter", "key_by", "time", "pattern", "within",
    "after_match", "emit_timeouts", "action",
];
const STAGE_KEYS: &[&str] = &[
    "name", "where", "contiguity", "negate", "times", "optional", "greedy", "inner", "until", "within",
    "group", "all",
];
const ACTION_KEYS: &[&str] = &["targets", "delay", "enrich", "template", "dedupe"];
const ENRICH_KEYS: &[&str] = &["lookup", "key", "as"];

fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

impl Reader {
    fn err(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn unknown_keys(&mut self, obj: &Map<String, Json>, allowed: &[&str], stage: Option<&str>, what: &str) {
        for k in obj.keys() {
            if !allowed.contains(&k.as_str()) {
                let mut d = Diagnostic::new(
                    "E002",
                    format!("unknown key `{k}` in {what} (allowed: {})", allowed.join(", ")),
                )
                .key(k.clone());
                if let Some(s) = stage {
                    d = d.stage(s);
                }
                self.err(d);
            }
        }
    }

    fn string(&mut self, v: &Json, key: &str, stage: Option<&str>) -> Option<String> {
        match v {
            Json::String(s) => Some(s.clone()),
            other => {
                let mut d = Diagnostic::new("E003", format!("expected a string, found {}", type_name(other))).key(key);
                if let Some(s) = stage {
                    d = d.stage(s);
                }
                self.err(d);
                None
            }
        }
    }

    fn boolean(&mut self, v: &Json, key: &str, stage: Option<&str>) -> Option<bool> {
        match v {
            Json::Bool(b) => Some(*b),
            other => {
                let mut d = Diagnostic::new("E003", format!("expected true or false, found {}", type_name(other))).key(key);
                if let Some(s) = stage {
                    d = d.stage(s);
                }
                self.err(d);
                None
            }
        }
    }

    fn duration(&mut self, v: &Json, key: &str, stage: Option<&str>) -> Option<i64> {
        let ms = match v {
            Json::Number(n) => n.as_i64(),
            Json::String(s) => parse_duration(s),
            _ => None,
        };
        let mk = |msg: String| {
            let d = Diagnostic::new("E004", msg).key(key);
            match stage {
                Some(s) => d.stage(s),
                None => d,
            }
        };
        match ms {
            Some(ms) if ms > 0 => Some(ms),
            Some(ms) => {
                self.err(mk(format!("duration must be greater than 0, got {ms}")));
                None
            }
            None => {
                self.err(mk(format!(
                    "expected a duration (milliseconds, or `500ms`, `10s`, `5m`, `2h`, `1d`), found {v}"
                )));
                None
            }
        }
    }

    fn contiguity(&mut self, v: &Json, key: &str, stage: &str) -> Option<Contiguity> {
        match v.as_str() {
            Some("strict") => Some(Contiguity::Strict),
            Some("relaxed") => Some(Contiguity::Relaxed),
            Some("any") => Some(Contiguity::Any),
            _ => {
                self.err(
                    Diagnostic::new("E005", format!("expected \"strict\", \"relaxed\" or \"any\", found {v}"))
                        .stage(stage)
                        .key(key),
                );
                None
            }
        }
    }

    fn times(&mut self, v: &Json, stage: &str) -> Option<Times> {
        let bad = |r: &mut Reader, msg: String| {
            r.err(Diagnostic::new("E006", msg).stage(stage).key("times"));
            None
        };
        let int = |v: &Json| v.as_u64().and_then(|n| u32::try_from(n).ok());
        let t = match v {
            Json::Number(_) => match int(v) {
                Some(n) => Times { min: n, max: Some(n) },
                None => return bad(self, format!("expected a non-negative integer, found {v}")),
            },
            Json::Array(a) if a.len() == 2 => match (int(&a[0]), int(&a[1])) {
                (Some(n), Some(m)) => Times { min: n, max: Some(m) },
                _ => return bad(self, format!("expected [min, max] with non-negative integers, found {v}")),
            },
            Json::Object(o) => {
                for k in o.keys() {
                    if k != "min" && k != "max" {
                        return bad(self, format!("unknown key `{k}` in times (allowed: min, max)"));
                    }
                }
                let min = match o.get("min").map(int) {
                    Some(Some(n)) => n,
                    _ => return bad(self, "times object needs an integer `min`".to_string()),
                };
                let max = match o.get("max") {
                    None => None,
                    Some(m) => match int(m) {
                        Some(n) => Some(n),
                        None => return bad(self, format!("`max` must be a non-negative integer, found {m}")),
                    },
                };
                Times { min, max }
            }
            other => {
                return bad(self, format!("expected n, [n, m], {{\"min\": n}} or {{\"min\": n, \"max\": m}}, found {other}"))
            }
        };
        if t.max == Some(0) {
            return bad(self, "times max must be at least 1".to_string());
        }
        if let Some(m) = t.max {
            if t.min > m {
                return bad(self, format!("times min {} is greater than max {m}", t.min));
            }
        }
        Some(t)
    }

    fn rule(&mut self, doc: &Json) -> Option<RuleSpec> {
        let Some(obj) = doc.as_object() else {
            self.err(Diagnostic::new("E003", format!("a rule must be an object, found {}", type_name(doc))));
            return None;
        };
        self.unknown_keys(obj, RULE_KEYS, None, "rule");
        let id = match obj.get("id") {
            None => {
                self.err(Diagnostic::new("E007", "missing required key `id`").key("id"));
                None
            }
            Some(v) => self.string(v, "id", None).and_then(|id| {
                let ok = !id.is_empty()
                    && id.len() <= 128
                    && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
                if ok {
                    Some(id)
                } else {
                    self.err(
                        Diagnostic::new("E008", format!("id `{id}` must be 1 to 128 characters of A-Z a-z 0-9 _ . -"))
                            .key("id"),
                    );
                    None
                }
            }),
        };
        let version = match obj.get("version") {
            None => {
                self.err(Diagnostic::new("E007", "missing required key `version`").key("version"));
                None
            }
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Some(n),
                _ => {
                    self.err(Diagnostic::new("E003", format!("version must be an integer >= 1, found {v}")).key("version"));
                    None
                }
            },
        };
        let name = obj.get("name").and_then(|v| self.string(v, "name", None));
        let enabled = obj.get("enabled").and_then(|v| self.boolean(v, "enabled", None)).unwrap_or(true);
        let source = obj.get("source").and_then(|v| self.string(v, "source", None));
        let filter = obj.get("filter").and_then(|v| self.string(v, "filter", None));
        let key_by = match obj.get("key_by") {
            None => Vec::new(),
            Some(Json::String(s)) => vec![s.clone()],
            Some(Json::Array(a)) => a
                .iter()
                .filter_map(|v| self.string(v, "key_by", None))
                .collect(),
            Some(other) => {
                self.err(
                    Diagnostic::new("E003", format!("key_by must be a field path or an array of them, found {}", type_name(other)))
                        .key("key_by"),
                );
                Vec::new()
            }
        };
        let time = match obj.get("time") {
            None => TimeMode::Event,
            Some(v) => match v.as_str() {
                Some("event") => TimeMode::Event,
                Some("processing") => TimeMode::Processing,
                _ => {
                    self.err(Diagnostic::new("E005", format!("time must be \"event\" or \"processing\", found {v}")).key("time"));
                    TimeMode::Event
                }
            },
        };
        let within = obj.get("within").and_then(|v| self.duration(v, "within", None));
        let after_match = match obj.get("after_match") {
            None | Some(Json::Null) => AfterMatchSpec::NoSkip,
            Some(Json::String(s)) => match s.as_str() {
                "no_skip" => AfterMatchSpec::NoSkip,
                "skip_to_next" => AfterMatchSpec::SkipToNext,
                "skip_past_last_event" => AfterMatchSpec::SkipPastLastEvent,
                other => {
                    self.err(Diagnostic::new("E005", format!(
                        "unknown after_match `{other}` (no_skip, skip_to_next, skip_past_last_event, {{\"skip_to_first\": stage}}, {{\"skip_to_last\": stage}})"
                    )).key("after_match"));
                    AfterMatchSpec::NoSkip
                }
            },
            Some(Json::Object(o)) if o.len() == 1 => {
                let (k, v) = o.iter().next().unwrap();
                match (k.as_str(), v.as_str()) {
                    ("skip_to_first", Some(s)) => AfterMatchSpec::SkipToFirst(s.to_string()),
                    ("skip_to_last", Some(s)) => AfterMatchSpec::SkipToLast(s.to_string()),
                    _ => {
                        self.err(Diagnostic::new("E005", format!("after_match object must be {{\"skip_to_first\": stage}} or {{\"skip_to_last\": stage}}, found {}", Json::Object(o.clone()))).key("after_match"));
                        AfterMatchSpec::NoSkip
                    }
                }
            }
            Some(other) => {
                self.err(Diagnostic::new("E005", format!("invalid after_match {other}")).key("after_match"));
                AfterMatchSpec::NoSkip
            }
        };
        let emit_timeouts = obj.get("emit_timeouts").and_then(|v| self.boolean(v, "emit_timeouts", None)).unwrap_or(false);
        let action = obj.get("action").and_then(|v| self.action(v));
        let pattern = match obj.get("pattern") {
            None => {
                self.err(Diagnostic::new("E007", "missing required key `pattern`").key("pattern"));
                Vec::new()
            }
            Some(Json::Array(a)) if !a.is_empty() => a.iter().filter_map(|s| self.stage(s, false)).collect(),
            Some(other) => {
                self.err(Diagnostic::new("E003", format!("pattern must be a non-empty array of stages, found {other}")).key("pattern"));
                Vec::new()
            }
        };
        let spec = RuleSpec {
            name: name.unwrap_or_else(|| id.clone().unwrap_or_default()),
            id: id?,
            version: version?,
            enabled,
            source,
            filter,
            key_by,
            time,
            pattern,
            within,
            after_match,
            emit_timeouts,
            action,
            document: doc.clone(),
        };
        self.structure(&spec);
        Some(spec)
    }

    fn action(&mut self, v: &Json) -> Option<ActionSpec> {
        let Some(o) = v.as_object() else {
            self.err(Diagnostic::new("E003", format!("action must be an object, found {}", type_name(v))).key("action"));
            return None;
        };
        self.unknown_keys(o, ACTION_KEYS, None, "action");
        let mut a = ActionSpec::default();
        if let Some(t) = o.get("targets") {
            match t {
                Json::Array(ts) => a.targets = ts.iter().filter_map(|t| self.string(t, "action.targets", None)).collect(),
                Json::String(s) => a.targets = vec![s.clone()],
                other => self.err(Diagnostic::new("E003", format!("targets must be an array of target names, found {}", type_name(other))).key("action.targets")),
            }
        }
        a.delay = o.get("delay").and_then(|v| self.duration(v, "action.delay", None));
        a.dedupe = o.get("dedupe").and_then(|v| self.duration(v, "action.dedupe", None));
        a.template = o.get("template").and_then(|v| self.string(v, "action.template", None));
        if let Some(e) = o.get("enrich") {
            match e.as_array() {
                Some(list) => {
                    for item in list {
                        let Some(io) = item.as_object() else {
                            self.err(Diagnostic::new("E003", "each enrich entry must be an object").key("action.enrich"));
                            continue;
                        };
                        self.unknown_keys(io, ENRICH_KEYS, None, "action.enrich entry");
                        let get = |r: &mut Reader, k: &str| match io.get(k) {
                            Some(v) => r.string(v, &format!("action.enrich.{k}"), None),
                            None => {
                                r.err(Diagnostic::new("E007", format!("enrich entry needs `{k}`")).key("action.enrich"));
                                None
                            }
                        };
                        let (l, k, al) = (get(self, "lookup"), get(self, "key"), get(self, "as"));
                        if let (Some(lookup), Some(key), Some(alias)) = (l, k, al) {
                            a.enrich.push(EnrichSpec { lookup, key, alias });
                        }
                    }
                }
                None => self.err(Diagnostic::new("E003", "enrich must be an array").key("action.enrich")),
            }
        }
        Some(a)
    }

    fn stage(&mut self, v: &Json, inside_group: bool) -> Option<StageSpec> {
        let Some(o) = v.as_object() else {
            self.err(Diagnostic::new("E003", format!("a stage must be an object, found {}", type_name(v))).key("pattern"));
            return None;
        };
        let name = match o.get("name") {
            Some(Json::String(s)) => s.clone(),
            Some(other) => {
                self.err(Diagnostic::new("E003", format!("stage name must be a string, found {other}")).key("name"));
                return None;
            }
            None => {
                self.err(Diagnostic::new("E007", "stage without a `name`").key("name"));
                return None;
            }
        };
        let sn = Some(name.as_str());
        if !is_identifier(&name) {
            self.err(Diagnostic::new("E009", format!("stage name `{name}` must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")).stage(&name).key("name"));
        }
        self.unknown_keys(o, STAGE_KEYS, sn, "stage");
        let kind = if let Some(g) = o.get("group") {
            if o.contains_key("all") || o.contains_key("where") {
                self.err(Diagnostic::new("E010", "a stage has one of `where`, `group` or `all`").stage(&name).key("group"));
            }
            match g.as_array() {
                Some(list) if !list.is_empty() => StageKindSpec::Group(list.iter().filter_map(|s| self.stage(s, true)).collect()),
                _ => {
                    self.err(Diagnostic::new("E003", "group must be a non-empty array of stages").stage(&name).key("group"));
                    StageKindSpec::Group(Vec::new())
                }
            }
        } else if let Some(all) = o.get("all") {
            for k in o.keys() {
                if k != "name" && k != "all" {
                    self.err(Diagnostic::new("E011", format!("an `all` stage takes only `name` and `all`, not `{k}`")).stage(&name).key(k.clone()));
                }
            }
            if inside_group {
                self.err(Diagnostic::new("E011", "an `all` stage may not stand inside a group").stage(&name).key("all"));
            }
            let mut inner = Vec::new();
            match all.as_array() {
                Some(list) if list.len() >= 2 => {
                    for item in list {
                        let Some(io) = item.as_object() else {
                            self.err(Diagnostic::new("E003", "each inner stage of `all` must be an object").stage(&name).key("all"));
                            continue;
                        };
                        let iname = io.get("name").and_then(|v| v.as_str()).unwrap_or("").to_string();
                        for k in io.keys() {
                            if k != "name" && k != "where" {
                                self.err(Diagnostic::new("E011", format!("inner stages of `all` take only `name` and `where`, not `{k}`")).stage(if iname.is_empty() { &name } else { &iname }).key(k.clone()));
                            }
                        }
                        if !is_identifier(&iname) {
                            self.err(Diagnostic::new("E009", format!("inner stage name `{iname}` must be an identifier")).stage(&name).key("name"));
                            continue;
                        }
                        let cond = io.get("where").and_then(|v| self.string(v, "where", Some(&iname)));
                        inner.push(StageSpec { name: iname, kind: StageKindSpec::Single { condition: cond }, ..plain() });
                    }
                }
                _ => self.err(Diagnostic::new("E011", "`all` needs an array of two or more inner stages").stage(&name).key("all")),
            }
            return Some(StageSpec { name, kind: StageKindSpec::All(inner), ..plain() });
        } else {
            StageKindSpec::Single { condition: o.get("where").and_then(|v| self.string(v, "where", sn)) }
        };
        let contiguity = o.get("contiguity").and_then(|v| self.contiguity(v, "contiguity", &name)).unwrap_or_default();
        let inner = o.get("inner").and_then(|v| self.contiguity(v, "inner", &name)).unwrap_or_default();
        let negate = o.get("negate").and_then(|v| self.boolean(v, "negate", sn)).unwrap_or(false);
        let optional = o.get("optional").and_then(|v| self.boolean(v, "optional", sn)).unwrap_or(false);
        let greedy = o.get("greedy").and_then(|v| self.boolean(v, "greedy", sn)).unwrap_or(false);
        let times = o.get("times").and_then(|v| self.times(v, &name)).unwrap_or(Times::ONE);
        let until = o.get("until").and_then(|v| self.string(v, "until", sn));
        let within = o.get("within").and_then(|v| self.duration(v, "within", sn));
        Some(StageSpec { name, kind, contiguity, negate, times, optional, greedy, inner, until, within })
    }

    /// Structural rules of the spec that involve more than one key.
    fn structure(&mut self, rule: &RuleSpec) {
        let mut names: Vec<&str> = Vec::new();
        fn collect<'a>(stages: &'a [StageSpec], names: &mut Vec<&'a str>) {
            for s in stages {
                names.push(&s.name);
                match &s.kind {
                    StageKindSpec::Group(g) => collect(g, names),
                    StageKindSpec::All(a) => collect(a, names),
                    StageKindSpec::Single { .. } => {}
                }
            }
        }
        collect(&rule.pattern, &mut names);
        let mut seen = std::collections::HashSet::new();
        for n in &names {
            if !seen.insert(*n) {
                self.err(Diagnostic::new("E012", format!("duplicate stage name `{n}`")).stage(*n).key("name"));
            }
        }
        self.sequence(&rule.pattern, rule, true);
        match &rule.after_match {
            AfterMatchSpec::SkipToFirst(s) | AfterMatchSpec::SkipToLast(s) => {
                let target = find_stage(&rule.pattern, s);
                match target {
                    None => self.err(Diagnostic::new("E013", format!("after_match names stage `{s}`, which the pattern does not have")).key("after_match")),
                    Some(st) if matches!(st.kind, StageKindSpec::All(_)) => self.err(Diagnostic::new("E013", format!(
                        "after_match may not name the `all` stage `{s}`; name one of its inner stages"
                    )).key("after_match")),
                    Some(st) if matches!(st.kind, StageKindSpec::Group(_)) => self.err(Diagnostic::new("E013", format!(
                        "after_match may not name the group `{s}`; name one of its inner stages"
                    )).key("after_match")),
                    Some(_) => {}
                }
            }
            _ => {}
        }
    }

    /// Checks one sequence of stages (the pattern, or a group's body).
    fn sequence(&mut self, stages: &[StageSpec], rule: &RuleSpec, top: bool) {
        for (i, s) in stages.iter().enumerate() {
            let name = s.name.as_str();
            let (times, optional) = s.effective_times();
            let looping = !times.is_one();
            let is_group = matches!(s.kind, StageKindSpec::Group(_));
            if s.negate {
                if optional {
                    self.err(Diagnostic::new("E020", "a negated stage cannot be optional").stage(name).key("negate"));
                }
                if looping {
                    self.err(Diagnostic::new("E020", "a negated stage cannot repeat (`times`)").stage(name).key("negate"));
                }
                if is_group {
                    self.err(Diagnostic::new("E020", "a group cannot be negated").stage(name).key("negate"));
                }
                if i == 0 && top {
                    self.err(Diagnostic::new("E021", "the first stage cannot be negated").stage(name).key("negate"));
                }
                if i > 0 {
                    let prev = &stages[i - 1];
                    if prev.effective_times().1 {
                        self.err(Diagnostic::new("E022", format!("a negated stage cannot follow the optional stage `{}`", prev.name)).stage(name).key("negate"));
                    }
                }
                if s.contiguity == Contiguity::Any && (i > 0 || !top) {
                    self.err(Diagnostic::new("E023", "a negated stage takes contiguity \"strict\" (not next) or \"relaxed\" (not followed by)").stage(name).key("negate"));
                }
                if top && i + 1 == stages.len() && s.contiguity == Contiguity::Relaxed && rule.within.is_none() && s.within.is_none() {
                    self.err(Diagnostic::new("E024", "a negated relaxed last stage (\"A, then no B\") needs `within` on the rule or on this stage").stage(name).key("negate"));
                }
            }
            if s.until.is_some() && !times.is_unbounded() {
                self.err(Diagnostic::new("E025", "`until` applies only to a stage that repeats without bound (`times: {\"min\": n}`)").stage(name).key("until"));
            }
            if s.greedy {
                if is_group {
                    self.err(Diagnostic::new("E026", "`greedy` does not apply to a group").stage(name).key("greedy"));
                } else if !looping {
                    self.err(Diagnostic::new("E026", "`greedy` applies only to a repeating stage (`times`)").stage(name).key("greedy"));
                } else if s.inner == Contiguity::Any {
                    self.err(Diagnostic::new("E026", "`greedy` cannot be combined with inner \"any\"").stage(name).key("greedy"));
                }
            }
            if i > 0 && s.optional && stages[i - 1].greedy {
                // Flink refuses `optional()` after a greedy stage; `times: [0, n]` is accepted.
                self.err(Diagnostic::new("E027", format!("an optional stage cannot follow the greedy stage `{}`", stages[i - 1].name)).stage(name).key("optional"));
            }
            if let Some(w) = s.within {
                if is_group {
                    self.err(Diagnostic::new("E028", "a stage `within` does not apply to a group").stage(name).key("within"));
                } else if looping {
                    self.err(Diagnostic::new("E028", "a stage `within` does not apply to a repeating stage").stage(name).key("within"));
                }
                if let Some(rw) = rule.within {
                    if w > rw {
                        self.err(Diagnostic::new("E029", format!("stage within ({w} ms) is longer than the rule's within ({rw} ms)")).stage(name).key("within"));
                    }
                }
            }
            if let StageKindSpec::Group(g) = &s.kind {
                self.sequence(g, rule, false);
            }
        }
    }
}

fn plain() -> StageSpec {
    StageSpec {
        name: String::new(),
        kind: StageKindSpec::Single { condition: None },
        contiguity: Contiguity::Relaxed,
        negate: false,
        times: Times::ONE,
        optional: false,
        greedy: false,
        inner: Contiguity::Relaxed,
        until: None,
        within: None,
    }
}

fn find_stage<'a>(stages: &'a [StageSpec], name: &str) -> Option<&'a StageSpec> {
    for s in stages {
        if s.name == name {
            return Some(s);
        }
        match &s.kind {
            StageKindSpec::Group(g) | StageKindSpec::All(g) => {
                if let Some(f) = find_stage(g, name) {
                    return Some(f);
                }
            }
            StageKindSpec::Single { .. } => {}
        }
    }
    None
}
