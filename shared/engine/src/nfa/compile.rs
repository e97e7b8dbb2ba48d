//! Pattern → automaton, following Flink's `NFACompiler` step by step
//! (backwards from the final state; copies for optional stages after
//! negations; greedy conditions; groups), plus Cepheid's `all` stage.
//! See `shared/docs/flink-nfa.md` §1 of the material handed to the project and
//! `design.md` beside this file.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cepheid_rules::{CompiledRule, CompiledStage, Contiguity, Expr, StageBody};

use super::model::{Action, Cond, Nfa, State, StateId, StateKind, Transition};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Strategy {
    Strict,
    SkipTillNext,
    SkipTillAny,
    NotNext,
    NotFollow,
}

/// A stage in its sequence (Flink's `Pattern` with `getPrevious()`).
#[derive(Clone, Copy)]
struct PatRef<'a> {
    seq: &'a [CompiledStage],
    idx: usize,
}

impl<'a> PatRef<'a> {
    fn stage(&self) -> &'a CompiledStage {
        &self.seq[self.idx]
    }
    fn previous(&self) -> Option<PatRef<'a>> {
        (self.idx > 0).then(|| PatRef { seq: self.seq, idx: self.idx - 1 })
    }
    fn key(&self) -> *const CompiledStage {
        self.stage() as *const _
    }
    fn name(&self) -> &'a str {
        &self.stage().name
    }
    fn is_group(&self) -> bool {
        matches!(self.stage().body, StageBody::Group(_))
    }
    fn is_all(&self) -> bool {
        matches!(self.stage().body, StageBody::All(_))
    }
    fn looping(&self) -> bool {
        self.stage().times.max.is_none()
    }
    fn times_prop(&self) -> bool {
        !self.looping() && !self.stage().times.is_one()
    }
    fn optional(&self) -> bool {
        self.stage().optional
    }
    fn greedy(&self) -> bool {
        self.stage().greedy
    }
    /// Flink's consuming strategy; the first stage of any sequence is `begin` (strict).
    fn strategy(&self) -> Strategy {
        let s = self.stage();
        if self.idx == 0 {
            return Strategy::Strict;
        }
        if s.negate {
            return if s.contiguity == Contiguity::Strict { Strategy::NotNext } else { Strategy::NotFollow };
        }
        contig(s.contiguity)
    }
    fn inner_strategy(&self) -> Strategy {
        contig(self.stage().inner)
    }
}

fn contig(c: Contiguity) -> Strategy {
    match c {
        Contiguity::Strict => Strategy::Strict,
        Contiguity::Relaxed => Strategy::SkipTillNext,
        Contiguity::Any => Strategy::SkipTillAny,
    }
}

struct Compiler<'a> {
    states: Vec<State>,
    used_names: HashSet<String>,
    stop_states: HashMap<String, StateId>,
    window: i64,
    current_group: Option<PatRef<'a>>,
    first_of_loop: HashMap<*const CompiledStage, bool>,
    current: PatRef<'a>,
    following: Option<PatRef<'a>>,
    original_state_map: HashMap<String, StateId>,
    exprs: Vec<Arc<Expr>>,
    top: &'a [CompiledStage],
}

/// Builds the automaton of a compiled rule.
pub fn build_nfa(rule: &CompiledRule) -> Nfa {
    let top = &rule.pattern[..];
    let mut c = Compiler {
        states: Vec::new(),
        used_names: HashSet::new(),
        stop_states: HashMap::new(),
        window: rule.within().unwrap_or(0),
        current_group: None,
        first_of_loop: HashMap::new(),
        current: PatRef { seq: top, idx: top.len() - 1 },
        following: None,
        original_state_map: HashMap::new(),
        exprs: Vec::new(),
        top,
    };
    let final_state = c.create_state("$endState$", StateKind::Final);
    let sink = c.create_middle_states(final_state);
    let start = c.convert_pattern(sink);
    c.states[start as usize].kind = StateKind::Start;

    let mut aggs_by_leaf = vec![Vec::new(); rule.leaves.len()];
    for (i, a) in rule.aggs.iter().enumerate() {
        aggs_by_leaf[a.stage as usize].push(i as u32);
    }
    let expr_reads_stages: Vec<bool> = c.exprs.iter().map(|e| e.reads_stages()).collect();
    let history_free = (0..c.states.len()).map(|s| history_free(&c.states, &expr_reads_stages, s as StateId)).collect();
    let has_stage_windows = c.states.iter().any(|s| s.window.is_some());
    let proceed_cycles = proceed_cycles(&c.states);
    Nfa {
        history_free,
        proceed_cycles,
        has_stage_windows,
        states: c.states,
        start,
        final_state,
        window: c.window,
        exprs: c.exprs,
        expr_reads_stages,
        aggs: rule.aggs.clone(),
        aggs_by_leaf,
        after_match: rule.after_match,
        emit_timeouts: rule.emit_timeouts(),
        leaf_names: rule.leaves.iter().map(|l| l.name.clone()).collect(),
        leaf_negated: rule.leaves.iter().map(|l| l.negated).collect(),
    }
}

fn cond_reads_stages(c: &Cond, reads: &[bool]) -> bool {
    match c {
        Cond::True => false,
        Cond::Expr(i) => reads[*i as usize],
        Cond::Not(x) => cond_reads_stages(x, reads),
        Cond::And(a, b) => cond_reads_stages(a, reads) || cond_reads_stages(b, reads),
        Cond::Or(v) => v.iter().any(|x| cond_reads_stages(x, reads)),
    }
}

/// Do PROCEED edges (whatever their conditions) form a cycle?
fn proceed_cycles(states: &[State]) -> bool {
    // 0 unseen, 1 on the current path, 2 done
    fn visit(states: &[State], s: usize, mark: &mut [u8]) -> bool {
        mark[s] = 1;
        for t in &states[s].transitions {
            if t.action == Action::Proceed {
                let x = t.target as usize;
                if mark[x] == 1 || (mark[x] == 0 && visit(states, x, mark)) {
                    return true;
                }
            }
        }
        mark[s] = 2;
        false
    }
    let mut mark = vec![0u8; states.len()];
    (0..states.len()).any(|s| mark[s] == 0 && visit(states, s, &mut mark))
}

/// No condition reachable from `s` through PROCEED edges reads stage history.
fn history_free(states: &[State], reads: &[bool], s: StateId) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![s];
    while let Some(x) = stack.pop() {
        if !seen.insert(x) {
            continue;
        }
        for t in &states[x as usize].transitions {
            if cond_reads_stages(&t.cond, reads) {
                return false;
            }
            if t.action == Action::Proceed {
                stack.push(t.target);
            }
        }
    }
    true
}

impl<'a> Compiler<'a> {
    // ---- states and transitions -------------------------------------------

    fn unique_name(&mut self, base: &str) -> String {
        let mut candidate = base.to_string();
        let mut counter = 0;
        while self.used_names.contains(&candidate) {
            candidate = format!("{base}:{counter}");
            counter += 1;
        }
        self.used_names.insert(candidate.clone());
        candidate
    }

    fn create_state(&mut self, name: &str, kind: StateKind) -> StateId {
        let name = self.unique_name(name);
        self.states.push(State { name, kind, transitions: Vec::new(), window: None });
        (self.states.len() - 1) as StateId
    }

    /// Flink's `createState(type, isTake)`: the stage window goes on the take
    /// state of a non-repeating stage.
    fn create_state_take(&mut self, kind: StateKind, is_take: bool) -> StateId {
        let st = self.current.stage();
        let id = self.create_state(&st.name.clone(), kind);
        if is_take && st.times.is_one() {
            self.states[id as usize].window = st.within;
        }
        id
    }

    fn add(&mut self, from: StateId, action: Action, to: StateId, cond: Cond, page: u16) {
        self.states[from as usize].transitions.push(Transition { action, source: from, target: to, cond, page });
    }

    fn add_take(&mut self, from: StateId, to: StateId, cond: Cond) {
        let page = self.page();
        self.add(from, Action::Take, to, cond, page);
    }

    fn add_ignore(&mut self, from: StateId, to: StateId, cond: Cond) {
        self.add(from, Action::Ignore, to, cond, 0);
    }

    fn add_proceed(&mut self, from: StateId, to: StateId, cond: Cond) {
        self.add(from, Action::Proceed, to, cond, 0);
    }

    /// Leaf index of the current (plain) stage.
    fn page(&self) -> u16 {
        match &self.current.stage().body {
            StageBody::Single { leaf, .. } => *leaf,
            _ => 0,
        }
    }

    fn is_stop(&self, s: StateId) -> bool {
        self.states[s as usize].kind == StateKind::Stop
    }

    // ---- conditions --------------------------------------------------------

    fn expr(&mut self, e: &Arc<Expr>) -> Cond {
        if let Some(i) = self.exprs.iter().position(|x| Arc::ptr_eq(x, e)) {
            return Cond::Expr(i as u32);
        }
        self.exprs.push(e.clone());
        Cond::Expr((self.exprs.len() - 1) as u32)
    }

    /// The stage's own condition (`pattern.getCondition()`).
    fn condition(&mut self, p: PatRef<'a>) -> Cond {
        match &p.stage().body {
            StageBody::Single { condition: Some(e), .. } => self.expr(e),
            _ => Cond::True,
        }
    }

    fn until(&mut self, p: PatRef<'a>) -> Option<Cond> {
        p.stage().until.as_ref().map(|u| self.expr(u))
    }

    fn group_until(&mut self) -> Option<Cond> {
        let g = self.current_group?;
        self.until(g)
    }

    fn extend_with_until(c: Option<Cond>, until: Option<Cond>, is_take: bool) -> Option<Cond> {
        match (c, until) {
            (Some(c), Some(u)) => Some(Cond::and(Cond::not(u), c)),
            (None, Some(u)) if is_take => Some(Cond::not(u)),
            (c, _) => c,
        }
    }

    fn take_condition(&mut self, p: PatRef<'a>) -> Cond {
        let c = self.condition(p);
        let gu = self.group_until();
        Self::extend_with_until(Some(c), gu, true).unwrap()
    }

    fn true_function(&mut self) -> Cond {
        let gu = self.group_until();
        Self::extend_with_until(Some(Cond::True), gu, true).unwrap()
    }

    fn head_of_group(&self, p: PatRef<'a>) -> bool {
        self.current_group.is_some() && p.previous().is_none()
    }

    fn ignore_for(&mut self, strategy: Strategy, p: PatRef<'a>) -> Option<Cond> {
        let ig = match strategy {
            Strategy::SkipTillNext => Some(Cond::not(self.condition(p))),
            Strategy::SkipTillAny => Some(Cond::True),
            _ => None,
        };
        let gu = self.group_until();
        if gu.is_some() {
            Self::extend_with_until(ig, gu, false)
        } else {
            ig
        }
    }

    fn inner_ignore_condition(&mut self, p: PatRef<'a>) -> Option<Cond> {
        let mut s = p.inner_strategy();
        if self.head_of_group(p) {
            s = self.current_group.unwrap().inner_strategy();
        }
        self.ignore_for(s, p)
    }

    fn ignore_condition(&mut self, p: PatRef<'a>) -> Option<Cond> {
        let mut s = p.strategy();
        if self.head_of_group(p) {
            let g = self.current_group.unwrap();
            s = if self.is_current_group_first_of_loop() { g.strategy() } else { g.inner_strategy() };
        }
        self.ignore_for(s, p)
    }

    fn set_first_of_loop(&mut self, v: bool) {
        if self.current.is_group() {
            self.first_of_loop.insert(self.current.key(), v);
        }
    }

    fn is_current_group_first_of_loop(&self) -> bool {
        match self.current_group {
            Some(g) => *self.first_of_loop.get(&g.key()).unwrap_or(&true),
            None => true,
        }
    }

    fn is_head_of_optional_group(&self, p: PatRef<'a>) -> bool {
        self.head_of_group(p) && self.is_current_group_first_of_loop() && self.current_group.unwrap().optional()
    }

    fn current_not_conditions(&mut self) -> Vec<(Cond, String)> {
        let mut out = Vec::new();
        let mut prev = self.current;
        while let Some(pp) = prev.previous() {
            if !(pp.optional() || pp.strategy() == Strategy::NotFollow) {
                break;
            }
            prev = pp;
            if prev.strategy() == Strategy::NotFollow {
                let c = self.take_condition(prev);
                out.push((c, prev.name().to_string()));
            }
        }
        out
    }

    // ---- Flink's compiler, method by method -----------------------------

    fn create_middle_states(&mut self, sink: StateId) -> StateId {
        let mut last_sink = sink;
        while let Some(prev) = self.current.previous() {
            match self.current.strategy() {
                Strategy::NotFollow => {
                    let has_window = self.current.stage().within.is_some() || self.window > 0;
                    if has_window && self.states[last_sink as usize].kind == StateKind::Final {
                        let pending = self.create_state_take(StateKind::Pending, true);
                        let not = self.take_condition(self.current);
                        let stop = self.create_stop_state(not.clone(), self.current.name());
                        self.add_proceed(pending, stop, not.clone());
                        self.add_ignore(pending, pending, Cond::not(not));
                        last_sink = pending;
                    }
                }
                Strategy::NotNext => {
                    let nn = self.create_state_take(StateKind::Normal, true);
                    let not = self.take_condition(self.current);
                    let stop = self.create_stop_state(not.clone(), self.current.name());
                    if self.states[last_sink as usize].kind == StateKind::Final {
                        self.add_ignore(nn, last_sink, Cond::not(not.clone()));
                    } else {
                        self.add_proceed(nn, last_sink, Cond::not(not.clone()));
                    }
                    self.add_proceed(nn, stop, not);
                    // Resting in a strict negation, the only next take is the
                    // following stage's: its window applies here too (spec).
                    let next_w = self.states[last_sink as usize].window;
                    let own = self.states[nn as usize].window;
                    self.states[nn as usize].window = match (own, next_w) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    last_sink = nn;
                }
                _ => {
                    last_sink = self.convert_pattern(last_sink);
                }
            }
            self.following = Some(self.current);
            self.current = prev;
        }
        last_sink
    }

    fn convert_pattern(&mut self, sink: StateId) -> StateId {
        let last = if self.current.looping() {
            self.set_first_of_loop(false);
            let s = self.copy_without_transitive_nots(sink);
            let looping = self.create_looping(s);
            self.set_first_of_loop(true);
            let t = self.current.stage().times.min;
            self.create_times_state(looping, sink, t, t)
        } else if self.current.times_prop() {
            let t = self.current.stage().times;
            self.create_times_state(sink, sink, t.min, t.max.unwrap())
        } else {
            self.create_singleton_state(sink)
        };
        self.add_stop_states(last);
        last
    }

    fn create_stop_state(&mut self, cond: Cond, name: &str) -> StateId {
        if let Some(s) = self.stop_states.get(name) {
            return *s;
        }
        let st = self.create_state(name, StateKind::Stop);
        // The stop state's self-take records the negated stage's event.
        let page = self.leaf_of(name);
        self.add(st, Action::Take, st, cond, page);
        self.stop_states.insert(name.to_string(), st);
        st
    }

    fn leaf_of(&self, name: &str) -> u16 {
        fn find(stages: &[CompiledStage], name: &str) -> Option<u16> {
            for s in stages {
                match &s.body {
                    StageBody::Single { leaf, .. } if s.name == name => return Some(*leaf),
                    StageBody::Group(g) => {
                        if let Some(l) = find(g, name) {
                            return Some(l);
                        }
                    }
                    _ => {}
                }
            }
            None
        }
        find(self.top, name).unwrap_or(0)
    }

    fn copy_without_transitive_nots(&mut self, sink: StateId) -> StateId {
        let nots = self.current_not_conditions();
        if nots.is_empty() || !self.current.optional() {
            return sink;
        }
        let (name, kind) = {
            let s = &self.states[sink as usize];
            (s.name.clone(), s.kind)
        };
        let copy = self.create_state(&name, kind);
        self.states[copy as usize].window = self.states[sink as usize].window;
        let transitions = self.states[sink as usize].transitions.clone();
        for t in transitions {
            if t.action == Action::Proceed {
                let mut target = t.target;
                let mut remove = false;
                if self.is_stop(target) {
                    for (_, n) in &nots {
                        if self.states[target as usize].name == *n {
                            remove = true;
                        }
                    }
                } else {
                    target = self.copy_without_transitive_nots(t.target);
                }
                if !remove {
                    self.add(copy, Action::Proceed, target, t.cond, t.page);
                }
            } else {
                let target = if t.target == t.source { copy } else { t.target };
                self.add(copy, t.action, target, t.cond, t.page);
            }
        }
        copy
    }

    fn copy(&mut self, state: StateId) -> StateId {
        let (name, kind, window) = {
            let s = &self.states[state as usize];
            (s.name.split(':').next().unwrap_or("").to_string(), s.kind, s.window)
        };
        let copy = self.create_state(&name, kind);
        self.states[copy as usize].window = window;
        let transitions = self.states[state as usize].transitions.clone();
        for t in transitions {
            let target = if t.target == t.source { copy } else { t.target };
            self.add(copy, t.action, target, t.cond, t.page);
        }
        copy
    }

    fn add_stop_states(&mut self, state: StateId) {
        for (cond, name) in self.current_not_conditions() {
            let stop = self.create_stop_state(cond.clone(), &name);
            self.add_proceed(state, stop, cond);
        }
    }

    fn add_stop_state_to_looping(&mut self, state: StateId) {
        if let Some(f) = self.following {
            if f.strategy() == Strategy::NotFollow {
                let cond = self.take_condition(f);
                let stop = self.create_stop_state(cond.clone(), f.name());
                self.add_proceed(state, stop, cond);
            }
        }
    }

    fn create_times_state(&mut self, sink: StateId, proceed: StateId, from: u32, to: u32) -> StateId {
        let mut last = sink;
        self.set_first_of_loop(false);
        let until = self.until(self.current);
        let inner = self.inner_ignore_condition(self.current);
        let inner_ignore = Self::extend_with_until(inner, until.clone(), false);
        let tc = self.take_condition(self.current);
        let take = Self::extend_with_until(Some(tc), until.clone(), true).unwrap();
        if self.current.greedy() && from != to {
            if until.is_some() {
                let copy = self.copy(sink);
                let name = self.states[sink as usize].name.clone();
                self.original_state_map.insert(name, copy);
            }
            self.update_with_greedy_condition(sink, take.clone());
        }
        for _ in from..to {
            last = self.create_singleton_full(last, Some(proceed), take.clone(), inner_ignore.clone(), true);
            self.add_stop_state_to_looping(last);
        }
        for _ in 0..from.saturating_sub(1) {
            last = self.create_singleton_full(last, None, take.clone(), inner_ignore.clone(), false);
            self.add_stop_state_to_looping(last);
        }
        self.set_first_of_loop(true);
        let ignore = self.ignore_condition(self.current);
        let optional = self.current.optional();
        self.create_singleton_full(last, Some(proceed), take, ignore, optional)
    }

    fn create_singleton_state(&mut self, sink: StateId) -> StateId {
        let take = self.take_condition(self.current);
        let ignore = self.ignore_condition(self.current);
        let optional = self.current.optional();
        self.create_singleton_full(sink, Some(sink), take, ignore, optional)
    }

    fn create_singleton_full(
        &mut self,
        sink: StateId,
        proceed: Option<StateId>,
        take: Cond,
        ignore: Option<Cond>,
        optional: bool,
    ) -> StateId {
        if self.current.is_group() {
            return self.create_group_state(self.current, sink, proceed, optional);
        }
        if self.current.is_all() {
            return self.create_all_state(sink, ignore.is_some());
        }
        let single = self.create_state_take(StateKind::Normal, true);
        let s = self.copy_without_transitive_nots(sink);
        self.add_take(single, s, take.clone());
        let proceed_cond = self.true_function();
        if optional {
            let proceed = proceed.expect("optional state needs a proceed target");
            if self.current.greedy() {
                let until = self.until(self.current);
                if let Some(u) = until.clone() {
                    let name = self.states[proceed as usize].name.clone();
                    let target = self.original_state_map.get(&name).copied().unwrap_or(proceed);
                    self.add_proceed(single, target, Cond::and(proceed_cond.clone(), u));
                }
                let c = match until {
                    Some(u) => Cond::and(proceed_cond, Cond::not(u)),
                    None => proceed_cond,
                };
                self.add_proceed(single, proceed, c);
            } else {
                self.add_proceed(single, proceed, proceed_cond);
            }
        }
        if let Some(ig) = ignore {
            let ignore_state = if optional || self.is_head_of_optional_group(self.current) {
                let st = self.create_state_take(StateKind::Normal, false);
                // Cepheid enforces the stage window in the ignore twin too
                // (Flink does not; the spec's stage `within` is always enforced).
                self.states[st as usize].window = self.states[single as usize].window;
                self.add_take(st, s, take);
                self.add_ignore(st, st, ig.clone());
                self.add_stop_states(st);
                st
            } else {
                single
            };
            self.add_ignore(single, ignore_state, ig);
        }
        single
    }

    fn enter_group(&mut self, group: PatRef<'a>) -> (PatRef<'a>, Option<PatRef<'a>>, Option<PatRef<'a>>) {
        let saved = (self.current, self.following, self.current_group);
        let StageBody::Group(inner) = &group.stage().body else { unreachable!() };
        self.current_group = Some(group);
        self.current = PatRef { seq: &inner[..], idx: inner.len() - 1 };
        saved
    }

    fn create_group_state(&mut self, group: PatRef<'a>, sink: StateId, proceed: Option<StateId>, optional: bool) -> StateId {
        let proceed_cond = self.true_function();
        let saved = self.enter_group(group);
        let mut last = self.create_middle_states(sink);
        last = self.convert_pattern(last);
        if optional {
            if let Some(p) = proceed {
                self.add_proceed(last, p, proceed_cond);
            }
        }
        (self.current, self.following, self.current_group) = saved;
        last
    }

    fn create_looping_group_state(&mut self, group: PatRef<'a>, sink: StateId) -> StateId {
        let proceed_cond = self.true_function();
        let dummy = self.create_state_take(StateKind::Normal, true);
        let saved = self.enter_group(group);
        let mut last = self.create_middle_states(dummy);
        last = self.convert_pattern(last);
        self.add_proceed(last, sink, proceed_cond.clone());
        self.add_proceed(dummy, last, proceed_cond);
        (self.current, self.following, self.current_group) = saved;
        last
    }

    fn create_looping(&mut self, sink: StateId) -> StateId {
        if self.current.is_group() {
            return self.create_looping_group_state(self.current, sink);
        }
        let until = self.until(self.current);
        let inner = self.inner_ignore_condition(self.current);
        let ignore = Self::extend_with_until(inner, until.clone(), false);
        let tc = self.take_condition(self.current);
        let take = Self::extend_with_until(Some(tc.clone()), until.clone(), true).unwrap();
        let proceed_cond = self.true_function();
        let looping = self.create_state_take(StateKind::Normal, true);
        if self.current.greedy() {
            if let Some(u) = until.clone() {
                let copy = self.copy(sink);
                self.add_proceed(looping, copy, Cond::and(proceed_cond.clone(), u));
                let name = self.states[sink as usize].name.clone();
                self.original_state_map.insert(name, copy);
            }
            let c = match until {
                Some(u) => Cond::and(proceed_cond, Cond::not(u)),
                None => proceed_cond,
            };
            self.add_proceed(looping, sink, c);
            self.update_with_greedy_condition(sink, tc);
        } else {
            self.add_proceed(looping, sink, proceed_cond);
        }
        self.add_take(looping, looping, take.clone());
        self.add_stop_state_to_looping(looping);
        if let Some(ig) = ignore {
            let ignore_state = self.create_state_take(StateKind::Normal, false);
            self.add_take(ignore_state, looping, take);
            self.add_ignore(ignore_state, ignore_state, ig.clone());
            self.add_ignore(looping, ignore_state, ig);
            self.add_stop_state_to_looping(ignore_state);
        }
        looping
    }

    fn update_with_greedy_condition(&mut self, state: StateId, take: Cond) {
        for t in self.states[state as usize].transitions.iter_mut() {
            let c = std::mem::replace(&mut t.cond, Cond::True);
            t.cond = Cond::and(c, Cond::not(take.clone()));
        }
    }

    /// Cepheid's unordered set: one state per proper subset of inner stages
    /// already filled. From each, every empty inner stage whose condition holds
    /// may take the event (a branch each); an event none takes is skipped.
    /// A negation before the set guards only the entry state.
    fn create_all_state(&mut self, sink: StateId, entry_ignores: bool) -> StateId {
        let StageBody::All(inner) = &self.current.stage().body else { unreachable!() };
        let inner = inner.clone();
        let inner: Vec<(u16, Cond)> = inner
            .iter()
            .map(|(leaf, c)| (*leaf, c.as_ref().map(|e| self.expr(e)).unwrap_or(Cond::True)))
            .collect();
        let k = inner.len();
        let full = (1u32 << k) - 1;
        let name = self.current.name().to_string();
        let mut ids: HashMap<u32, StateId> = HashMap::new();
        // Create states from the fullest subsets down so targets exist.
        let mut masks: Vec<u32> = (0..full).collect();
        masks.sort_by_key(|m| std::cmp::Reverse(m.count_ones()));
        let after_take = self.copy_without_transitive_nots(sink);
        for mask in masks {
            let st = self.create_state(&name, StateKind::Normal);
            ids.insert(mask, st);
            let mut empty_conds = Vec::new();
            for (i, (leaf, cond)) in inner.iter().enumerate() {
                if mask & (1 << i) != 0 {
                    continue;
                }
                let next = mask | (1 << i);
                let target = if next == full { after_take } else { ids[&next] };
                self.add(st, Action::Take, target, cond.clone(), *leaf);
                empty_conds.push(cond.clone());
            }
            if mask != 0 || entry_ignores {
                self.add_ignore(st, st, Cond::not(Cond::Or(empty_conds)));
            }
        }
        ids[&0]
    }
}
