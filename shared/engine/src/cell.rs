//! One key's state for the rules of one key signature: the unit a matcher
//! shard keeps in an actor, passivates to Redis and restores.
//!
//! [`KeyCell::step`] does for one key what [`crate::engine::Engine`] does for
//! all keys when its watermark advances: the key's released events in
//! `(time, arrival)` order (each first expiring what is due at its time, then
//! processed), then the deadlines due at the watermark. Keys are independent,
//! so a shard that steps every key with the same released events and
//! watermarks produces exactly the engine's matches.

use std::sync::Arc;

use cepheid_rules::{compile, CompiledRule, Diagnostic, Diagnostics, NoStages, RuleSpec, TimeMode};
use cepheid_types::{Event, EventDecoder, FieldId, FieldRegistry, MatchKind, MatchRecord};
use serde::{Deserialize, Serialize};

use crate::engine::{build_record, EngineConfig};
use crate::index::{gate_for, RuleIndex};
use crate::key::KeyVals;
use crate::nfa::{build_nfa, CondCache, Nfa, NfaOutput, NfaState};
use crate::snapshot::{key_from_json, key_to_json, KeySnapshot};

/// A compiled rule as a shard runs it.
pub struct CellRule {
    pub rule: Arc<CompiledRule>,
    pub nfa: Arc<Nfa>,
    pub key_names: Vec<String>,
    /// The automaton's [`crate::snapshot::fingerprint`] (computed once: snapshots name it).
    pub automaton: String,
}

impl CellRule {
    pub fn id(&self) -> &str {
        self.rule.id()
    }
    pub fn version(&self) -> u64 {
        self.rule.version()
    }
}

/// The rules of one key signature, with an index over their filters and
/// start conditions (a rule holding state for a key is always offered the
/// key's events; see [`crate::index`]).
#[derive(Clone, Default)]
pub struct SigRules {
    slots: Vec<Option<Arc<CellRule>>>,
    index: RuleIndex,
}

impl SigRules {
    pub fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The rule in a slot (as [`RuleEvals::slot`] names it).
    pub fn rule_at(&self, slot: usize) -> Option<&Arc<CellRule>> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<CellRule>> {
        self.slots.iter().flatten()
    }
    /// The slot and rule of `id` at `version`.
    fn find(&self, id: &str, version: u64) -> Option<(usize, &Arc<CellRule>)> {
        self.slots.iter().enumerate().find_map(|(i, s)| s.as_ref().filter(|r| r.id() == id && r.version() == version).map(|r| (i, r)))
    }
}

/// The enabled rules of a shard, grouped by key signature (the `key_by`
/// fields joined by `,`), with the field registry events are decoded with.
#[derive(Clone, Default)]
pub struct RuleBook {
    registry: FieldRegistry,
    engine: EngineConfig,
    /// Time field per source name (interned in `registry`).
    time_fields: Vec<(String, FieldId)>,
    default_time: FieldId,
    by_sig: std::collections::BTreeMap<String, Arc<SigRules>>,
    /// id → (version, signature, slot)
    ids: std::collections::BTreeMap<String, (u64, String, usize)>,
}

impl RuleBook {
    pub fn new(engine: EngineConfig) -> RuleBook {
        let mut registry = FieldRegistry::new();
        let default_time = registry.intern(&engine.default_source.time_field);
        let time_fields = engine.sources.iter().map(|(n, s)| (n.clone(), registry.intern(&s.time_field))).collect();
        RuleBook { registry, engine, time_fields, default_time, by_sig: Default::default(), ids: Default::default() }
    }

    /// Adds or replaces a rule (a disabled rule is removed). A rule already
    /// loaded at the same version is left as it is, with its keys' state.
    pub fn upsert(&mut self, spec: &RuleSpec) -> Result<(), Diagnostics> {
        if self.ids.get(&spec.id).is_some_and(|(v, _, _)| *v == spec.version) && spec.enabled {
            return Ok(());
        }
        self.remove(&spec.id);
        if !spec.enabled {
            return Ok(());
        }
        if spec.time == TimeMode::Processing {
            // Key cells step in event time only; running it here would silently change its results.
            let mut d = Diagnostic::new(
                "E200",
                "`time: processing` rules are not run by the cluster's matcher shards yet (only by `cepheid run`); the rule is skipped",
            );
            d.rule = Some(spec.id.clone());
            return Err(Diagnostics::one(d));
        }
        let rule = compile(spec, &mut self.registry)?;
        let nfa = Arc::new(build_nfa(&rule));
        let gate = gate_for(rule.filter.as_deref(), &nfa);
        let sig = spec.key_by.join(",");
        let automaton = crate::snapshot::fingerprint(&nfa);
        let cell = Arc::new(CellRule { rule: Arc::new(rule), nfa, key_names: spec.key_by.clone(), automaton });
        let rules = Arc::make_mut(self.by_sig.entry(sig.clone()).or_default());
        let slot = match rules.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                rules.slots.push(None);
                rules.slots.len() - 1
            }
        };
        rules.slots[slot] = Some(cell);
        rules.index.insert(slot, gate);
        self.ids.insert(spec.id.clone(), (spec.version, sig, slot));
        Ok(())
    }

    /// Removes rule `id` (its keys' state goes when they are next stepped).
    pub fn remove(&mut self, id: &str) {
        if let Some((_, sig, slot)) = self.ids.remove(id) {
            let rules = Arc::make_mut(self.by_sig.get_mut(&sig).expect("indexed"));
            rules.slots[slot] = None;
            rules.index.remove(slot);
            if rules.is_empty() {
                self.by_sig.remove(&sig);
            }
        }
    }

    /// Loaded rules: id → version.
    pub fn rules(&self) -> impl Iterator<Item = (&str, u64)> {
        self.ids.iter().map(|(id, (v, _, _))| (id.as_str(), *v))
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The rules keyed by `signature`.
    pub fn signature(&self, signature: &str) -> Option<&Arc<SigRules>> {
        self.by_sig.get(signature)
    }

    /// Decodes an event of `source` whose time the router already read.
    pub fn decode(&self, source: &str, text: &str, time: i64) -> Result<Event, cepheid_types::DecodeError> {
        let tf = self.time_fields.iter().find(|(n, _)| n == source).map_or(self.default_time, |x| x.1);
        EventDecoder::new(&self.registry, tf).decode_with_time(text, time)
    }

    /// [`RuleBook::decode`] of text the event may keep (no copy).
    pub fn decode_owned(&self, source: &str, text: String, time: i64) -> Result<Event, cepheid_types::DecodeError> {
        let tf = self.time_fields.iter().find(|(n, _)| n == source).map_or(self.default_time, |x| x.1);
        EventDecoder::new(&self.registry, tf).decode_owned_with_time(text, time)
    }

    pub fn engine_config(&self) -> &EngineConfig {
        &self.engine
    }
}

struct Running {
    rule: Arc<CellRule>,
    /// Its slot in the current [`SigRules`] (set at each step).
    slot: usize,
    nfa: NfaState,
    deadline: Option<i64>,
}

/// One key's automata, one per rule of its signature holding state.
pub struct KeyCell {
    key: Option<KeyVals>,
    /// `key` as the JSON text a snapshot holds (every checkpoint writes it;
    /// made once, when the key is set).
    key_json: Option<Box<str>>,
    running: Vec<Running>,
    cache: CondCache,
    out: Vec<NfaOutput>,
}

/// What a step produced.
#[derive(Debug, Default)]
pub struct StepOutput {
    pub records: Vec<MatchRecord>,
    /// The earliest deadline of the key's rules after the step.
    pub deadline: Option<i64>,
    /// Whether the key holds no state any more.
    pub idle: bool,
    /// Per rule evaluated: how often, and the time of a sample of them.
    pub evals: Vec<RuleEvals>,
}

/// Evaluations of one rule (by its slot in [`SigRules`]) during a step. One
/// evaluation in [`TIMED_EVERY`] is timed, so that timing costs little on the
/// hot path: `nanos / timed` estimates the mean evaluation time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleEvals {
    pub slot: usize,
    pub count: u64,
    pub timed: u64,
    pub nanos: u64,
}

/// One evaluation in this many is timed.
pub const TIMED_EVERY: u32 = 16;

thread_local! {
    static EVAL_TICK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether to time this evaluation.
fn timed_now() -> Option<std::time::Instant> {
    EVAL_TICK.with(|t| {
        let n = t.get().wrapping_add(1);
        t.set(n);
        (n % TIMED_EVERY == 0).then(std::time::Instant::now)
    })
}

fn note_eval(evals: &mut Vec<RuleEvals>, slot: usize, started: Option<std::time::Instant>) {
    let e = match evals.iter_mut().find(|e| e.slot == slot) {
        Some(e) => e,
        None => {
            evals.push(RuleEvals { slot, ..Default::default() });
            evals.last_mut().expect("pushed")
        }
    };
    e.count += 1;
    if let Some(t) = started {
        e.timed += 1;
        e.nanos += t.elapsed().as_nanos() as u64;
    }
}

/// A released event: its source and its decoded form.
pub struct Released {
    pub source: Arc<str>,
    pub event: Event,
}

/// A cell's state as a document (per rule: id, version, automaton state).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CellSnapshot {
    pub key: Vec<serde_json::Value>,
    pub rules: Vec<CellRuleSnapshot>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CellRuleSnapshot {
    pub id: String,
    pub version: u64,
    pub state: KeySnapshot,
}

impl Default for KeyCell {
    fn default() -> Self {
        KeyCell::new()
    }
}

impl KeyCell {
    pub fn new() -> KeyCell {
        KeyCell { key: None, key_json: None, running: Vec::new(), cache: CondCache::new(0), out: Vec::new() }
    }

    /// Restores a cell from its snapshot. States of rules no longer in
    /// `rules` (removed, or at another version) are dropped and reported.
    pub fn restore(snap: CellSnapshot, rules: &SigRules, book: &RuleBook) -> (KeyCell, Vec<String>) {
        let mut cell = KeyCell::new();
        cell.set_key(Some(key_from_json(&snap.key)));
        let mut dropped = Vec::new();
        for r in snap.rules {
            let Some((slot, rule)) = rules.find(&r.id, r.version) else {
                dropped.push(format!("rule `{}` version {}: not running here any more", r.id, r.version));
                continue;
            };
            let tf = rule
                .rule
                .spec
                .source
                .as_deref()
                .and_then(|s| book.time_fields.iter().find(|(n, _)| n == s).map(|x| x.1))
                .unwrap_or(book.default_time);
            let dec = EventDecoder::new(&book.registry, tf);
            match NfaState::restore_as(r.state, &rule.nfa, &rule.automaton, &dec) {
                Ok(st) => {
                    let deadline = st.next_deadline(&rule.nfa);
                    cell.running.push(Running { rule: rule.clone(), slot, nfa: st, deadline });
                }
                Err(e) => dropped.push(format!("rule `{}`: {e}", r.id)),
            }
        }
        (cell, dropped)
    }

    pub fn snapshot(&self) -> CellSnapshot {
        CellSnapshot {
            key: self.key.as_ref().map(key_to_json).unwrap_or_default(),
            rules: self
                .running
                .iter()
                .map(|r| CellRuleSnapshot { id: r.rule.id().to_string(), version: r.rule.version(), state: r.nfa.snapshot_as(r.rule.automaton.clone()) })
                .collect(),
        }
    }

    /// The cell in its compact binary form ([`crate::cellcodec`]); reads back
    /// with [`crate::cellcodec::decode`] as the [`KeyCell::snapshot`] of this cell.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(crate::cellcodec::CELL_FORMAT)
    }

    /// [`KeyCell::encode`] in an earlier binary format (2), as checkpoints of
    /// earlier versions hold it: for tests that those still read.
    #[doc(hidden)]
    pub fn encode_as(&self, format: u8) -> Vec<u8> {
        let views: Vec<crate::cellcodec::RuleView<'_>> = self
            .running
            .iter()
            .map(|r| crate::cellcodec::RuleView { id: r.rule.id(), version: r.rule.version(), automaton: &r.rule.automaton, state: &r.nfa })
            .collect();
        crate::cellcodec::encode_as(format, self.key_json.as_deref().unwrap_or("[]"), &views)
    }

    fn set_key(&mut self, key: Option<KeyVals>) {
        self.key_json = key.as_ref().map(|k| serde_json::to_string(&key_to_json(k)).expect("key values serialise").into());
        self.key = key;
    }

    /// Partial matches held, over all rules.
    pub fn partial_count(&self) -> usize {
        self.running.iter().map(|r| r.nfa.partial_count()).sum()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty()
    }

    /// Processes `events` (already in `(time, arrival)` order), then fires
    /// the deadlines due at `watermark`. `rules` are the current rules of the
    /// key's signature: state of a rule no longer among them (removed or
    /// replaced by another version) is dropped first. `now` stamps records.
    pub fn step(&mut self, rules: &SigRules, events: &[Released], watermark: Option<i64>, now: i64) -> StepOutput {
        let mut records = Vec::new();
        let mut evals = Vec::new();
        // Rules replaced or removed since the last step lose their state; the
        // others are re-pointed at the book's (equal) compiled rule.
        self.running.retain_mut(|r| match rules.find(r.rule.id(), r.rule.version()) {
            Some((slot, x)) => {
                r.rule = x.clone();
                r.slot = slot;
                true
            }
            None => false,
        });
        let mut cand = Vec::new();
        for re in events {
            let ev = &re.event;
            let ts = ev.time();
            rules.index.candidates(ev, &mut cand);
            let before = cand.len();
            cand.extend(self.running.iter().map(|r| r.slot));
            if cand.len() != before {
                cand.sort_unstable();
                cand.dedup();
            }
            for &slot in &cand {
                let Some(rule) = rules.slots[slot].as_ref() else { continue };
                if rule.rule.spec.source.as_deref().is_some_and(|s| s != &*re.source) {
                    continue;
                }
                if let Some(f) = &rule.rule.filter {
                    if !f.holds(&NoStages(ev)) {
                        continue;
                    }
                }
                if self.key.is_none() {
                    self.set_key(KeyVals::of(ev, &rule.rule.key_by));
                }
                self.out.clear();
                let started = timed_now();
                let i = match self.running.iter().position(|r| r.slot == slot) {
                    Some(i) => {
                        let r = &mut self.running[i];
                        if r.deadline.is_some_and(|d| d <= ts) {
                            r.nfa.advance_time(&rule.nfa, ts, &mut self.out);
                        }
                        r.nfa.process(&rule.nfa, ev, ts, &mut self.cache, &mut self.out);
                        i
                    }
                    None => {
                        if !rule.nfa.can_start(ev, &mut self.cache) {
                            note_eval(&mut evals, slot, started);
                            continue;
                        }
                        let mut st = NfaState::new(&rule.nfa);
                        st.process(&rule.nfa, ev, ts, &mut self.cache, &mut self.out);
                        self.running.push(Running { rule: rule.clone(), slot, nfa: st, deadline: None });
                        self.running.len() - 1
                    }
                };
                self.settle(i, now, &mut records);
                note_eval(&mut evals, slot, started);
            }
        }
        if let Some(w) = watermark {
            // As the engine's timer loop: fire while a deadline is due (an
            // advance that leaves the same deadline due does not repeat).
            let mut i = 0;
            while i < self.running.len() {
                match self.running[i].deadline {
                    Some(d) if d <= w => {
                        self.out.clear();
                        let r = &mut self.running[i];
                        r.nfa.advance_time(&r.rule.nfa, w, &mut self.out);
                        let len = self.running.len();
                        self.settle(i, now, &mut records);
                        if self.running.len() == len && self.running[i].deadline == Some(d) {
                            i += 1;
                        }
                    }
                    _ => i += 1,
                }
            }
        }
        StepOutput { records, deadline: self.deadline(), idle: self.running.is_empty(), evals }
    }

    fn deadline(&self) -> Option<i64> {
        self.running.iter().filter_map(|r| r.deadline).min()
    }

    /// Emits the outputs of running rule `i`, updates its deadline, drops it when idle.
    fn settle(&mut self, i: usize, now: i64, records: &mut Vec<MatchRecord>) {
        let r = &mut self.running[i];
        let empty = KeyVals::default();
        let key = self.key.as_ref().unwrap_or(&empty);
        for o in self.out.drain(..) {
            let (events, kind) = match o {
                NfaOutput::Match { events, .. } => (events, MatchKind::Match),
                NfaOutput::Timeout { events, .. } => (events, MatchKind::Timeout),
            };
            records.push(build_record(&r.rule.rule, &r.rule.nfa, &r.rule.key_names, key, kind, events, now));
        }
        if r.nfa.is_idle() {
            self.running.remove(i);
        } else {
            r.deadline = r.nfa.next_deadline(&r.rule.nfa);
        }
    }
}
