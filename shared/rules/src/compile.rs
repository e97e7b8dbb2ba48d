//! `RuleSpec` → `CompiledRule`: conditions compiled, names resolved to slots.

use std::collections::HashMap;
use std::sync::Arc;

use cepheid_types::{FieldId, FieldRegistry};

use crate::agg::AggSpec;
use crate::diag::{Diagnostic, Diagnostics};
use crate::expr::{compile_condition, Expr, Scope};
use crate::spec::{ActionSpec, AfterMatchSpec, Contiguity, RuleSpec, StageKindSpec, StageSpec, TimeMode, Times};

/// A leaf stage: one that takes events (plain stages, inner stages of groups
/// and of `all`). Events of a match are reported under leaf names.
#[derive(Clone, Debug)]
pub struct LeafStage {
    pub name: String,
    /// Negated leaves never hold events in a match.
    pub negated: bool,
}

#[derive(Clone, Debug)]
pub enum StageBody {
    /// A plain stage: its condition (None = TRUE) and leaf index.
    Single { condition: Option<Arc<Expr>>, leaf: u16 },
    Group(Vec<CompiledStage>),
    /// Inner stages: (leaf index, condition).
    All(Vec<(u16, Option<Arc<Expr>>)>),
}

/// A stage with names resolved and conditions compiled.
#[derive(Clone, Debug)]
pub struct CompiledStage {
    pub name: String,
    pub body: StageBody,
    pub contiguity: Contiguity,
    pub negate: bool,
    /// `min >= 1`; a spec's `min: 0` is folded into `optional`.
    pub times: Times,
    pub optional: bool,
    pub greedy: bool,
    pub inner: Contiguity,
    pub until: Option<Arc<Expr>>,
    pub within: Option<i64>,
}

/// After-match skip with stage names resolved to leaf indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterMatch {
    NoSkip,
    SkipToNext,
    SkipPastLastEvent,
    SkipToFirst(u16),
    SkipToLast(u16),
}

/// A rule ready for the engine.
#[derive(Clone, Debug)]
pub struct CompiledRule {
    pub spec: Arc<RuleSpec>,
    pub filter: Option<Arc<Expr>>,
    pub key_by: Vec<FieldId>,
    pub pattern: Vec<CompiledStage>,
    pub leaves: Vec<LeafStage>,
    pub aggs: Vec<AggSpec>,
    pub after_match: AfterMatch,
}

impl CompiledRule {
    pub fn id(&self) -> &str {
        &self.spec.id
    }
    pub fn version(&self) -> u64 {
        self.spec.version
    }
    pub fn within(&self) -> Option<i64> {
        self.spec.within
    }
    pub fn time(&self) -> TimeMode {
        self.spec.time
    }
    pub fn emit_timeouts(&self) -> bool {
        self.spec.emit_timeouts
    }
    pub fn action(&self) -> Option<&ActionSpec> {
        self.spec.action.as_ref()
    }
    pub fn leaf_index(&self, name: &str) -> Option<u16> {
        self.leaves.iter().position(|l| l.name == name).map(|i| i as u16)
    }
}


/// Compiles a rule against a field registry (new field paths are registered).
pub fn compile(spec: &RuleSpec, registry: &mut FieldRegistry) -> Result<CompiledRule, Diagnostics> {
    let mut leaves = Vec::new();
    let mut leaf_ix: HashMap<String, u16> = HashMap::new();
    let mut containers: HashMap<String, &'static str> = HashMap::new();
    fn collect(
        stages: &[StageSpec],
        leaves: &mut Vec<LeafStage>,
        ix: &mut HashMap<String, u16>,
        containers: &mut HashMap<String, &'static str>,
    ) {
        for s in stages {
            match &s.kind {
                StageKindSpec::Single { .. } => {
                    ix.insert(s.name.clone(), leaves.len() as u16);
                    leaves.push(LeafStage { name: s.name.clone(), negated: s.negate });
                }
                StageKindSpec::Group(g) => {
                    containers.insert(s.name.clone(), "a group");
                    collect(g, leaves, ix, containers);
                }
                StageKindSpec::All(a) => {
                    containers.insert(s.name.clone(), "an `all`");
                    collect(a, leaves, ix, containers);
                }
            }
        }
    }
    collect(&spec.pattern, &mut leaves, &mut leaf_ix, &mut containers);

    let mut diags = Vec::new();
    let mut aggs = Vec::new();
    let mut fields_read = Vec::new();
    let mut cond = |text: &Option<String>,
                    stage: Option<&str>,
                    key: &str,
                    stages_allowed: bool,
                    registry: &mut FieldRegistry,
                    aggs: &mut Vec<AggSpec>,
                    diags: &mut Vec<Diagnostic>|
     -> Option<Arc<Expr>> {
        let text = text.as_ref()?;
        let mut scope = Scope {
            registry,
            leaves: &leaf_ix,
            containers: &containers,
            aggs,
            stages_allowed,
            fields_read: &mut fields_read,
        };
        match compile_condition(text, &mut scope) {
            Ok(e) => Some(Arc::new(e)),
            Err(ds) => {
                for mut d in ds {
                    d.key = Some(key.to_string());
                    d.stage = stage.map(str::to_string);
                    diags.push(d);
                }
                None
            }
        }
    };

    let filter = cond(&spec.filter, None, "filter", false, registry, &mut aggs, &mut diags);
    /// Compiles one condition (text, stage, what it is, whether a take's) into an expression.
    type CondFn<'a> = dyn FnMut(&Option<String>, Option<&str>, &str, bool, &mut FieldRegistry, &mut Vec<AggSpec>, &mut Vec<Diagnostic>) -> Option<Arc<Expr>> + 'a;
    fn stages(
        list: &[StageSpec],
        leaf_ix: &HashMap<String, u16>,
        cond: &mut CondFn<'_>,
        registry: &mut FieldRegistry,
        aggs: &mut Vec<AggSpec>,
        diags: &mut Vec<Diagnostic>,
    ) -> Vec<CompiledStage> {
        list.iter()
            .map(|s| {
                let body = match &s.kind {
                    StageKindSpec::Single { condition } => StageBody::Single {
                        condition: cond(condition, Some(&s.name), "where", true, registry, aggs, diags),
                        leaf: leaf_ix[&s.name],
                    },
                    StageKindSpec::Group(g) => StageBody::Group(stages(g, leaf_ix, cond, registry, aggs, diags)),
                    StageKindSpec::All(inner) => StageBody::All(
                        inner
                            .iter()
                            .map(|i| {
                                let c = match &i.kind {
                                    StageKindSpec::Single { condition } => {
                                        cond(condition, Some(&i.name), "where", true, registry, aggs, diags)
                                    }
                                    _ => None,
                                };
                                (leaf_ix[&i.name], c)
                            })
                            .collect(),
                    ),
                };
                let until = cond(&s.until, Some(&s.name), "until", true, registry, aggs, diags);
                let (times, optional) = s.effective_times();
                CompiledStage {
                    name: s.name.clone(),
                    body,
                    contiguity: s.contiguity,
                    negate: s.negate,
                    times,
                    optional,
                    greedy: s.greedy,
                    inner: s.inner,
                    until,
                    within: s.within,
                }
            })
            .collect()
    }
    let pattern = stages(&spec.pattern, &leaf_ix, &mut cond, registry, &mut aggs, &mut diags);

    let mut key_by = Vec::new();
    for k in &spec.key_by {
        if k.is_empty() || k.split('.').any(|p| p.is_empty()) {
            diags.push(Diagnostic::new("E030", format!("key_by field path `{k}` is not a valid path")).key("key_by"));
            continue;
        }
        key_by.push(registry.intern(k));
    }
    for f in fields_read.iter().chain(spec.key_by.iter()) {
        let head = f.split('.').next().unwrap_or("");
        if leaf_ix.contains_key(head) || containers.contains_key(head) {
            diags.push(
                Diagnostic::new("E031", format!("stage name `{head}` equals an event field the rule uses; rename the stage"))
                    .stage(head)
                    .key("name"),
            );
        }
    }

    let after_match = match &spec.after_match {
        AfterMatchSpec::NoSkip => AfterMatch::NoSkip,
        AfterMatchSpec::SkipToNext => AfterMatch::SkipToNext,
        AfterMatchSpec::SkipPastLastEvent => AfterMatch::SkipPastLastEvent,
        AfterMatchSpec::SkipToFirst(s) => leaf_ix.get(s).map(|l| AfterMatch::SkipToFirst(*l)).unwrap_or(AfterMatch::NoSkip),
        AfterMatchSpec::SkipToLast(s) => leaf_ix.get(s).map(|l| AfterMatch::SkipToLast(*l)).unwrap_or(AfterMatch::NoSkip),
    };

    if let Some(action) = &spec.action {
        check_action(action, &leaves, &mut diags);
    }

    if !diags.is_empty() {
        return Err(Diagnostics(diags).with_rule(&spec.id));
    }
    Ok(CompiledRule {
        spec: Arc::new(spec.clone()),
        filter,
        key_by,
        pattern,
        leaves,
        aggs,
        after_match,
    })
}

/// Names a notification template can use besides stage names and enrichment aliases.
pub const TEMPLATE_NAMES: &[&str] =
    &["rule", "key", "kind", "match_id", "first_event_time", "last_event_time", "detected_at", "stages", "targets"];

/// Template and enrichment checks: errors surface when the rule is validated,
/// never at delivery.
fn check_action(action: &ActionSpec, leaves: &[LeafStage], diags: &mut Vec<Diagnostic>) {
    for e in &action.enrich {
        let stage = e.key.split('.').next().unwrap_or("");
        if !leaves.iter().any(|l| l.name == stage) || !e.key.contains('.') {
            diags.push(
                Diagnostic::new("E041", format!("enrich key `{}` must be `stage.field` of a stage of this rule", e.key))
                    .key("action.enrich.key"),
            );
        }
        if leaves.iter().any(|l| l.name == e.alias) || TEMPLATE_NAMES.contains(&e.alias.as_str()) {
            diags.push(
                Diagnostic::new("E041", format!("enrich alias `{}` collides with a stage or template name", e.alias))
                    .key("action.enrich.as"),
            );
        }
    }
    let Some(t) = &action.template else { return };
    let env = minijinja::Environment::new();
    match env.template_from_str(t) {
        Err(e) => diags.push(
            Diagnostic::new("E040", format!("template does not parse: {}", e.detail().unwrap_or(&e.to_string())))
                .key("action.template")
                .at(e.line().unwrap_or(0) as u64, 0),
        ),
        Ok(tmpl) => {
            let mut unknown: Vec<String> = tmpl
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| {
                    !TEMPLATE_NAMES.contains(&v.as_str())
                        && !leaves.iter().any(|l| &l.name == v)
                        && !action.enrich.iter().any(|e| &e.alias == v)
                })
                .collect();
            unknown.sort();
            for v in unknown {
                let mut names: Vec<&str> = TEMPLATE_NAMES.to_vec();
                names.extend(leaves.iter().map(|l| l.name.as_str()));
                names.extend(action.enrich.iter().map(|e| e.alias.as_str()));
                diags.push(
                    Diagnostic::new("E040", format!("template refers to `{v}`, which is not defined (available: {})", names.join(", ")))
                        .key("action.template"),
                );
            }
        }
    }
}
