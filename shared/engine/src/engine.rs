//! The keyed, multi-rule engine: sources with watermarks, a reorder buffer,
//! late events, per-(rule, key) automata, timers for every deadline, live
//! rule versions, and snapshots.
//!
//! Time is event time driven by watermarks (or an injected [`Clock`] for
//! processing-time rules); nothing here reads the wall clock directly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;

use cepheid_rules::{compile, CompiledRule, Diagnostics, NoStages, RuleSpec, TimeMode};
use cepheid_types::{match_id, DecodeError, Event, EventDecoder, FieldId, FieldRegistry, MatchKind, MatchRecord};
use rustc_hash::FxHashMap;
use serde_json::value::RawValue;

use crate::index::{gate_for, Gate, RuleIndex};
use crate::key::KeyVals;
use crate::nfa::{build_nfa, CondCache, Nfa, NfaOutput, NfaState};

pub use cepheid_types::{Clock, ManualClock, SystemClock};

/// A source's time field and bounded out-of-orderness.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Field holding the event time in epoch milliseconds.
    #[serde(default = "default_time_field")]
    pub time_field: String,
    /// How late (ms) an event may arrive behind the newest one seen.
    #[serde(default = "default_ooo")]
    pub out_of_orderness_ms: i64,
}

fn default_time_field() -> String {
    "eventTime".into()
}
fn default_ooo() -> i64 {
    2_000
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig { time_field: default_time_field(), out_of_orderness_ms: default_ooo() }
    }
}

/// Engine configuration.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Used for sources not listed in `sources`.
    #[serde(default)]
    pub default_source: SourceConfig,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
}

/// What the engine emits.
#[derive(Clone, Debug)]
pub enum Output {
    Match(MatchRecord),
    /// An event behind its source's watermark: counted, never matched.
    Late { source: String, event: Event, watermark: i64 },
    /// An event no rule could use because it lacks a `key_by` field of every
    /// rule whose stream it belongs to.
    MissingKey { event: Event, rule: String, field: String },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Rule(#[from] Diagnostics),
    #[error("rule `{id}`: version {offered} is not newer than the running version {running}; a change needs a higher version")]
    StaleVersion { id: String, running: u64, offered: u64 },
    #[error("snapshot: {0}")]
    Snapshot(String),
}

/// What applying a rule did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleChange {
    Added { id: String, version: u64 },
    Replaced { id: String, old_version: u64, version: u64 },
}

/// Counters.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineStats {
    pub events: u64,
    pub late: u64,
    pub matches: u64,
    pub timeouts: u64,
    /// Events a rule's filter admitted but that lacked a key field.
    pub missing_key: u64,
    /// Deadlines that fired (windows, timeouts, trailing absences).
    pub timers_fired: u64,
}

struct Source {
    name: String,
    time_field: FieldId,
    bound: i64,
    max_seen: Option<i64>,
    watermark: i64,
}

/// An entry of a reorder buffer: ordered by (event time, arrival) alone,
/// whatever it carries (reachable through `Deref`). The engine's buffer and
/// the matcher shard's hold different items in the same order.
pub struct TimeOrdered<T> {
    pub t: i64,
    pub arrival: u64,
    pub item: T,
}
impl<T> PartialEq for TimeOrdered<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.t, self.arrival) == (o.t, o.arrival)
    }
}
impl<T> Eq for TimeOrdered<T> {}
impl<T> PartialOrd for TimeOrdered<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for TimeOrdered<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.t, self.arrival).cmp(&(o.t, o.arrival))
    }
}
impl<T> std::ops::Deref for TimeOrdered<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.item
    }
}
impl<T> std::ops::DerefMut for TimeOrdered<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.item
    }
}

/// An event waiting for the watermark: its source and its decoded form.
struct Held {
    source: usize,
    event: Event,
}
type Pending = TimeOrdered<Held>;

pub(crate) struct KeyState {
    pub(crate) nfa: NfaState,
    pub(crate) timer: Option<i64>,
}

pub(crate) struct RuleSlot {
    pub(crate) rule: Arc<CompiledRule>,
    pub(crate) nfa: Arc<Nfa>,
    source: Option<usize>,
    key_names: Vec<String>,
    pub(crate) keys: FxHashMap<KeyVals, KeyState>,
    pub(crate) matches: u64,
    /// For start-gated rules: the key signature, so keys holding state are
    /// found from the event (see [`crate::index`]).
    live_sig: Option<u32>,
}

/// The engine. Single-threaded: one instance per matcher thread / shard.
pub struct Engine {
    cfg: EngineConfig,
    registry: FieldRegistry,
    sources: Vec<Source>,
    source_ix: FxHashMap<String, usize>,
    pub(crate) slots: Vec<Option<RuleSlot>>,
    by_id: HashMap<String, usize>,
    reorder: BinaryHeap<Reverse<Pending>>,
    arrival: u64,
    released: i64,
    timers: BTreeSet<(i64, usize, KeyVals)>,
    pt_timers: BTreeSet<(i64, usize, KeyVals)>,
    clock: Arc<dyn Clock>,
    cache: CondCache,
    scratch: Vec<NfaOutput>,
    stats: EngineStats,
    index: RuleIndex,
    cand: Vec<usize>,
    /// Distinct `key_by` lists of start-gated rules.
    sigs: Vec<Vec<FieldId>>,
    /// (signature, key) → start-gated rules holding state for that key.
    live: FxHashMap<(u32, KeyVals), Vec<usize>>,
    index_disabled: bool,
    /// Loaded rules with `time: processing`.
    processing_rules: usize,
}

impl Engine {
    pub fn new(cfg: EngineConfig, clock: Arc<dyn Clock>) -> Engine {
        Engine {
            cfg,
            registry: FieldRegistry::new(),
            sources: Vec::new(),
            source_ix: FxHashMap::default(),
            slots: Vec::new(),
            by_id: HashMap::new(),
            reorder: BinaryHeap::new(),
            arrival: 0,
            released: i64::MIN,
            timers: BTreeSet::new(),
            pt_timers: BTreeSet::new(),
            clock,
            cache: CondCache::new(0),
            scratch: Vec::new(),
            stats: EngineStats::default(),
            index: RuleIndex::default(),
            cand: Vec::new(),
            sigs: Vec::new(),
            live: FxHashMap::default(),
            index_disabled: false,
            processing_rules: 0,
        }
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn registry(&self) -> &FieldRegistry {
        &self.registry
    }

    /// The document of a loaded rule.
    pub fn rule_spec(&self, id: &str) -> Option<&RuleSpec> {
        self.by_id.get(id).and_then(|i| self.slots[*i].as_ref()).map(|s| s.rule.spec.as_ref())
    }

    /// Rules currently loaded: (id, version).
    pub fn rules(&self) -> Vec<(String, u64)> {
        self.slots.iter().flatten().map(|s| (s.rule.id().to_string(), s.rule.version())).collect()
    }

    /// Matches emitted per rule id.
    pub fn matches_per_rule(&self) -> Vec<(String, u64)> {
        self.slots.iter().flatten().map(|s| (s.rule.id().to_string(), s.matches)).collect()
    }

    /// Live partial matches and keys with state, over all rules.
    pub fn state_size(&self) -> (usize, usize) {
        let mut partial = 0;
        let mut keys = 0;
        for s in self.slots.iter().flatten() {
            keys += s.keys.len();
            partial += s.keys.values().map(|k| k.nfa.partial_count()).sum::<usize>();
        }
        (partial, keys)
    }

    fn source(&mut self, name: &str) -> usize {
        if let Some(i) = self.source_ix.get(name) {
            return *i;
        }
        let cfg = self.cfg.sources.get(name).cloned().unwrap_or_else(|| self.cfg.default_source.clone());
        let time_field = self.registry.intern(&cfg.time_field);
        self.sources.push(Source {
            name: name.to_string(),
            time_field,
            bound: cfg.out_of_orderness_ms.max(0),
            max_seen: None,
            watermark: i64::MIN,
        });
        self.source_ix.insert(name.to_string(), self.sources.len() - 1);
        self.sources.len() - 1
    }

    /// Decodes one JSON line of a source.
    pub fn decode(&mut self, source: &str, line: &str) -> Result<Event, DecodeError> {
        let si = self.source(source);
        EventDecoder::new(&self.registry, self.sources[si].time_field).decode(line)
    }

    /// Decodes one JSON line, keeping the string as the event's text.
    pub fn decode_owned(&mut self, source: &str, line: String) -> Result<Event, DecodeError> {
        let si = self.source(source);
        EventDecoder::new(&self.registry, self.sources[si].time_field).decode_owned(line)
    }

    /// Adds a rule or replaces it with a newer version (new state; other
    /// rules keep theirs). Refuses an equal or older version.
    pub fn upsert_rule(&mut self, spec: &RuleSpec) -> Result<RuleChange, EngineError> {
        if let Some(&i) = self.by_id.get(&spec.id) {
            let running = self.slots[i].as_ref().unwrap().rule.version();
            if spec.version <= running {
                return Err(EngineError::StaleVersion { id: spec.id.clone(), running, offered: spec.version });
            }
        }
        let before = self.registry.len();
        let mut reg = self.registry.clone();
        let rule = compile(spec, &mut reg)?;
        self.registry = reg;
        if self.registry.len() != before {
            self.redecode_pending();
        }
        let source = spec.source.as_deref().map(|s| self.source(s));
        let nfa = Arc::new(build_nfa(&rule));
        let gate = if self.index_disabled { Gate::None } else { gate_for(rule.filter.as_deref(), &nfa) };
        let live_sig = match gate {
            Gate::Start(..) => Some(match self.sigs.iter().position(|s| *s == rule.key_by) {
                Some(i) => i as u32,
                None => {
                    self.sigs.push(rule.key_by.clone());
                    (self.sigs.len() - 1) as u32
                }
            }),
            _ => None,
        };
        let slot = RuleSlot {
            key_names: spec.key_by.clone(),
            rule: Arc::new(rule),
            nfa,
            source,
            keys: FxHashMap::default(),
            matches: 0,
            live_sig,
        };
        if spec.time == TimeMode::Processing {
            self.processing_rules += 1;
        }
        match self.by_id.get(&spec.id) {
            Some(&i) => {
                self.forget_slot(i);
                let old = self.slots[i].take().unwrap();
                self.slots[i] = Some(slot);
                self.index.insert(i, gate);
                Ok(RuleChange::Replaced { id: spec.id.clone(), old_version: old.rule.version(), version: spec.version })
            }
            None => {
                self.slots.push(Some(slot));
                let i = self.slots.len() - 1;
                self.by_id.insert(spec.id.clone(), i);
                self.index.insert(i, gate);
                Ok(RuleChange::Added { id: spec.id.clone(), version: spec.version })
            }
        }
    }

    /// Offers every event to every rule (no index). For tests that check the
    /// index never changes results.
    pub fn disable_index(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].is_some() {
                self.index.insert(i, Gate::None);
            }
        }
        self.index_disabled = true;
    }

    /// Drops a slot's timers and live-key entries (its state goes with it).
    fn forget_slot(&mut self, i: usize) {
        if self.slots[i].as_ref().is_some_and(|s| s.rule.time() == TimeMode::Processing) {
            self.processing_rules -= 1;
        }
        self.timers.retain(|(_, s, _)| *s != i);
        self.pt_timers.retain(|(_, s, _)| *s != i);
        if let Some(sig) = self.slots[i].as_ref().and_then(|s| s.live_sig) {
            self.live.retain(|(g, _), rules| {
                if *g == sig {
                    rules.retain(|r| *r != i);
                }
                !rules.is_empty()
            });
        }
    }

    /// Removes a rule and its state. Returns whether it existed.
    pub fn remove_rule(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some(i) => {
                self.forget_slot(i);
                self.index.remove(i);
                self.slots[i] = None;
                true
            }
            None => false,
        }
    }

    /// Events still in the reorder buffer were decoded before a new rule
    /// registered new fields: decode them again from their text.
    fn redecode_pending(&mut self) {
        let pending: Vec<Pending> = std::mem::take(&mut self.reorder).into_iter().map(|r| r.0).collect();
        for mut p in pending {
            let dec = EventDecoder::new(&self.registry, self.sources[p.source].time_field);
            if let Ok(e) = dec.decode(p.event.raw()) {
                p.event = e;
            }
            self.reorder.push(Reverse(p));
        }
    }

    fn global_watermark(&self) -> i64 {
        self.sources.iter().filter(|s| s.max_seen.is_some()).map(|s| s.watermark).min().unwrap_or(i64::MIN)
    }

    /// Feeds one decoded event of `source`. Outputs are appended to `out`.
    pub fn push(&mut self, source: &str, event: Event, out: &mut Vec<Output>) {
        let si = self.source(source);
        self.stats.events += 1;
        if self.processing_rules > 0 {
            let now = self.clock.now();
            self.fire_timers(true, now, out);
            self.dispatch(si, &event, now, true, out);
        }
        let t = event.time();
        let src = &mut self.sources[si];
        if t < src.watermark {
            self.stats.late += 1;
            out.push(Output::Late { source: src.name.clone(), event, watermark: src.watermark });
            return;
        }
        let newest = src.max_seen.map_or(t, |m| m.max(t));
        src.max_seen = Some(newest);
        src.watermark = src.watermark.max(newest.saturating_sub(src.bound));
        self.arrival += 1;
        self.reorder.push(Reverse(Pending { t, arrival: self.arrival, item: Held { source: si, event } }));
        let w = self.global_watermark();
        if w > self.released {
            self.advance_to(w, out);
        }
    }

    /// Processing-time progress: fires processing-time deadlines up to `now`.
    pub fn tick(&mut self, out: &mut Vec<Output>) {
        let now = self.clock.now();
        self.fire_timers(true, now, out);
    }

    /// End of a finite input: the watermark goes to +∞.
    pub fn finish(&mut self, out: &mut Vec<Output>) {
        self.advance_to(i64::MAX, out);
    }

    /// Current (global) watermark.
    pub fn watermark(&self) -> i64 {
        self.released
    }

    fn advance_to(&mut self, w: i64, out: &mut Vec<Output>) {
        while let Some(top) = self.reorder.peek() {
            if top.0.t >= w {
                break;
            }
            let Reverse(p) = self.reorder.pop().unwrap();
            self.dispatch(p.source, &p.event, p.t, false, out);
        }
        self.released = w;
        self.fire_timers(false, w, out);
    }

    fn fire_timers(&mut self, processing: bool, w: i64, out: &mut Vec<Output>) {
        loop {
            let timers = if processing { &mut self.pt_timers } else { &mut self.timers };
            let Some(first) = timers.first() else { break };
            if first.0 > w {
                break;
            }
            let (d, si, key) = timers.pop_first().unwrap();
            let Some(slot) = self.slots.get_mut(si).and_then(|s| s.as_mut()) else { continue };
            let Some(ks) = slot.keys.get_mut(&key) else { continue };
            if ks.timer != Some(d) {
                continue;
            }
            ks.timer = None;
            self.stats.timers_fired += 1;
            let nfa = slot.nfa.clone();
            self.scratch.clear();
            ks.nfa.advance_time(&nfa, w, &mut self.scratch);
            self.after_step(si, key, processing, out);
        }
    }

    fn dispatch(&mut self, si: usize, ev: &Event, ts: i64, processing: bool, out: &mut Vec<Output>) {
        let mut cand = std::mem::take(&mut self.cand);
        self.index.candidates(ev, &mut cand);
        if !self.live.is_empty() {
            let before = cand.len();
            for (g, fields) in self.sigs.iter().enumerate() {
                if let Some(rules) = KeyVals::of(ev, fields).and_then(|key| self.live.get(&(g as u32, key))) {
                    cand.extend_from_slice(rules);
                }
            }
            if cand.len() != before {
                cand.sort_unstable();
                cand.dedup();
            }
        }
        let mut used = false;
        let mut missing_key: Option<(String, String)> = None;
        for &i in &cand {
            let Some(slot) = self.slots[i].as_mut() else { continue };
            if !slot.rule.spec.enabled || (slot.rule.time() == TimeMode::Processing) != processing {
                continue;
            }
            if slot.source.is_some_and(|s| s != si) {
                continue;
            }
            if let Some(f) = &slot.rule.filter {
                if !f.holds(&NoStages(ev)) {
                    continue;
                }
            }
            let Some(key) = KeyVals::of(ev, &slot.rule.key_by) else {
                self.stats.missing_key += 1;
                if missing_key.is_none() {
                    let field = slot
                        .rule
                        .key_by
                        .iter()
                        .find(|f| ev.get(**f).is_null())
                        .map(|f| self.registry.path(*f).to_string())
                        .unwrap_or_default();
                    missing_key = Some((slot.rule.id().to_string(), field));
                }
                continue;
            };
            used = true;
            let nfa = slot.nfa.clone();
            self.scratch.clear();
            match slot.keys.get_mut(&key) {
                Some(ks) => {
                    // Expiry first (only when a deadline is due: otherwise a no-op).
                    if ks.timer.is_some_and(|d| d <= ts) {
                        ks.nfa.advance_time(&nfa, ts, &mut self.scratch);
                    }
                    ks.nfa.process(&nfa, ev, ts, &mut self.cache, &mut self.scratch);
                }
                None => {
                    if !nfa.can_start(ev, &mut self.cache) {
                        continue;
                    }
                    let mut st = NfaState::new(&nfa);
                    st.process(&nfa, ev, ts, &mut self.cache, &mut self.scratch);
                    slot.keys.insert(key.clone(), KeyState { nfa: st, timer: None });
                    if let Some(g) = slot.live_sig {
                        self.live.entry((g, key.clone())).or_default().push(i);
                    }
                }
            }
            self.after_step(i, key, processing, out);
        }
        self.cand = cand;
        if let (false, Some((rule, field))) = (used, missing_key) {
            out.push(Output::MissingKey { event: ev.clone(), rule, field });
        }
    }

    /// Emits what a step produced, reschedules the key's deadline, drops idle keys.
    fn after_step(&mut self, si: usize, key: KeyVals, processing: bool, out: &mut Vec<Output>) {
        let now = self.clock.now();
        let slot = self.slots[si].as_mut().unwrap();
        for o in self.scratch.drain(..) {
            let (events, kind) = match o {
                NfaOutput::Match { events, .. } => (events, MatchKind::Match),
                NfaOutput::Timeout { events, .. } => (events, MatchKind::Timeout),
            };
            match kind {
                MatchKind::Match => {
                    self.stats.matches += 1;
                    slot.matches += 1;
                }
                MatchKind::Timeout => self.stats.timeouts += 1,
            }
            out.push(Output::Match(build_record(&slot.rule, &slot.nfa, &slot.key_names, &key, kind, events, now)));
        }
        let Some(ks) = slot.keys.get_mut(&key) else { return };
        let timers = if processing { &mut self.pt_timers } else { &mut self.timers };
        if ks.nfa.is_idle() {
            if let Some(old) = ks.timer.take() {
                timers.remove(&(old, si, key.clone()));
            }
            slot.keys.remove(&key);
            if let Some(g) = slot.live_sig {
                let k = (g, key);
                if let Some(rules) = self.live.get_mut(&k) {
                    rules.retain(|r| *r != si);
                    if rules.is_empty() {
                        self.live.remove(&k);
                    }
                }
            }
            return;
        }
        let next = ks.nfa.next_deadline(&slot.nfa);
        if next != ks.timer {
            if let Some(old) = ks.timer {
                timers.remove(&(old, si, key.clone()));
            }
            if let Some(d) = next {
                timers.insert((d, si, key));
            }
            ks.timer = next;
        }
    }
}

/// Builds the spec's match record.
pub fn build_record(
    rule: &CompiledRule,
    nfa: &Nfa,
    key_names: &[String],
    key: &KeyVals,
    kind: MatchKind,
    events: Vec<(u16, Vec<Event>)>,
    now: i64,
) -> MatchRecord {
    let mut by_leaf: Vec<Vec<Event>> = vec![Vec::new(); nfa.leaf_names.len()];
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for (leaf, evs) in events {
        for e in &evs {
            first = first.min(e.time());
            last = last.max(e.time());
        }
        by_leaf[leaf as usize] = evs;
    }
    let raws: Vec<Vec<&str>> = by_leaf.iter().map(|l| l.iter().map(|e| e.raw()).collect()).collect();
    let key_repr = key.repr();
    let id = match_id(
        rule.id(),
        rule.version(),
        kind,
        &key_repr,
        nfa.leaf_names.iter().zip(raws.iter()).map(|(n, r)| (n.as_str(), r.as_slice())),
    );
    let stages = nfa
        .leaf_names
        .iter()
        .zip(by_leaf.iter())
        .map(|(n, evs)| {
            (n.clone(), evs.iter().map(|e| RawValue::from_string(e.raw().to_string()).expect("event text is JSON")).collect())
        })
        .collect();
    MatchRecord {
        rule_id: rule.id().to_string(),
        rule_version: rule.version(),
        kind,
        key: key.to_json(key_names),
        match_id: id,
        first_event_time: if first == i64::MAX { 0 } else { first },
        last_event_time: if last == i64::MIN { 0 } else { last },
        detected_at: now,
        stages,
    }
}

/// The whole engine's state (all rules' keys, watermarks, the reorder buffer).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineSnapshot {
    pub format: u32,
    pub sources: Vec<SourceSnap>,
    pub released: i64,
    pub arrival: u64,
    /// Events received but not yet released by the watermark.
    pub pending: Vec<PendingSnap>,
    pub rules: Vec<RuleSnap>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SourceSnap {
    pub name: String,
    pub max_seen: Option<i64>,
    pub watermark: i64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PendingSnap {
    /// Event time (ms).
    pub t: i64,
    pub arrival: u64,
    pub source: String,
    pub raw: String,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RuleSnap {
    pub id: String,
    pub version: u64,
    pub keys: Vec<KeyEntrySnap>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyEntrySnap {
    pub key: Vec<serde_json::Value>,
    pub state: crate::snapshot::KeySnapshot,
}

/// What a restore did.
#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    pub keys: usize,
    /// Rule states that could not be restored, with the reason (they start afresh).
    pub dropped: Vec<String>,
}

impl Engine {
    /// Snapshot of everything that decides future output.
    pub fn snapshot(&self) -> EngineSnapshot {
        let mut pending: Vec<PendingSnap> = self
            .reorder
            .iter()
            .map(|Reverse(p)| PendingSnap {
                t: p.t,
                arrival: p.arrival,
                source: self.sources[p.source].name.clone(),
                raw: p.event.raw().to_string(),
            })
            .collect();
        pending.sort_by_key(|p| (p.t, p.arrival));
        let rules = self
            .slots
            .iter()
            .flatten()
            .map(|s| {
                let mut keys: Vec<KeyEntrySnap> = s
                    .keys
                    .iter()
                    .map(|(k, ks)| KeyEntrySnap { key: crate::snapshot::key_to_json(k), state: ks.nfa.snapshot(&s.nfa) })
                    .collect();
                keys.sort_by_key(|a| serde_json::to_string(&a.key).unwrap());
                RuleSnap { id: s.rule.id().to_string(), version: s.rule.version(), keys }
            })
            .collect();
        EngineSnapshot {
            format: crate::snapshot::FORMAT,
            sources: self
                .sources
                .iter()
                .map(|s| SourceSnap { name: s.name.clone(), max_seen: s.max_seen, watermark: s.watermark })
                .collect(),
            released: self.released,
            arrival: self.arrival,
            pending,
            rules,
        }
    }

    /// Restores a snapshot into an engine that already has the rules loaded.
    /// States of rules that are missing or at another version are dropped
    /// (reported), never applied to the wrong rule.
    pub fn restore(&mut self, snap: EngineSnapshot) -> Result<RestoreReport, EngineError> {
        if snap.format > crate::snapshot::FORMAT {
            return Err(EngineError::Snapshot(format!("format {} is newer than this build understands", snap.format)));
        }
        let mut report = RestoreReport::default();
        for s in &snap.sources {
            let i = self.source(&s.name);
            self.sources[i].max_seen = s.max_seen;
            self.sources[i].watermark = s.watermark;
        }
        self.released = snap.released;
        self.arrival = snap.arrival;
        self.reorder.clear();
        for p in snap.pending {
            let si = self.source(&p.source);
            let dec = EventDecoder::new(&self.registry, self.sources[si].time_field);
            let event = dec.decode_with_time(&p.raw, p.t).map_err(|e| EngineError::Snapshot(format!("pending event: {e}")))?;
            self.reorder.push(Reverse(Pending { t: p.t, arrival: p.arrival, item: Held { source: si, event } }));
        }
        for r in snap.rules {
            let Some(&si) = self.by_id.get(&r.id) else {
                report.dropped.push(format!("rule `{}`: not loaded", r.id));
                continue;
            };
            let slot = self.slots[si].as_mut().unwrap();
            if slot.rule.version() != r.version {
                report.dropped.push(format!(
                    "rule `{}`: snapshot is of version {}, running version is {}",
                    r.id,
                    r.version,
                    slot.rule.version()
                ));
                continue;
            }
            let source_ix = slot.source;
            let time_field = match source_ix {
                Some(i) => self.sources[i].time_field,
                None => self.registry.get(&self.cfg.default_source.time_field).unwrap_or(0),
            };
            let dec = EventDecoder::new(&self.registry, time_field);
            let processing = slot.rule.time() == TimeMode::Processing;
            for k in r.keys {
                let key = crate::snapshot::key_from_json(&k.key);
                match NfaState::restore(k.state, &slot.nfa, &dec) {
                    Ok(st) => {
                        let deadline = st.next_deadline(&slot.nfa);
                        slot.keys.insert(key.clone(), KeyState { nfa: st, timer: deadline });
                        if let Some(g) = slot.live_sig {
                            self.live.entry((g, key.clone())).or_default().push(si);
                        }
                        if let Some(d) = deadline {
                            if processing {
                                self.pt_timers.insert((d, si, key));
                            } else {
                                self.timers.insert((d, si, key));
                            }
                        }
                        report.keys += 1;
                    }
                    Err(e) => report.dropped.push(format!("rule `{}` key {}: {e}", r.id, key.repr())),
                }
            }
        }
        Ok(report)
    }
}
