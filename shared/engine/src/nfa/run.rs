//! Running one key's automaton: Flink's `NFA.process` / `advanceTime` /
//! after-match skip, mirrored step by step (`flink-nfa.md` §2–§5).

use std::cmp::Ordering;
use std::sync::Arc;

use cepheid_rules::{AfterMatch, AggState, EvalCtx};
use cepheid_types::Value;
use cepheid_types::Event;

use super::buffer::{EventId, NodeId, Path, SharedBuffer};
use super::dewey::Dewey;
use super::model::{Action, Cond, Nfa, ProceedPath, StateId, StateKind};
use super::pq::{JavaPq, PqKey};

/// A partial match (Flink's `ComputationState`).
#[derive(Clone, Debug)]
pub struct Cs {
    pub state: StateId,
    pub node: Option<NodeId>,
    pub version: Dewey,
    pub start_ts: i64,
    pub prev_ts: i64,
    pub start_id: Option<EventId>,
    /// Aggregate slots over the events taken so far (None = all empty).
    pub aggs: Option<Arc<Vec<AggState>>>,
    /// A stage window this run still owes: it skipped an optional windowed
    /// stage, so its next take must come before this time (spec; Flink does
    /// not check it).
    pub deadline: Option<i64>,
}

impl PqKey for Cs {
    fn pq_cmp(&self, o: &Self) -> Ordering {
        match (&self.start_id, &o.start_id) {
            (Some(a), Some(b)) => a.cmp(b),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        }
    }
}

/// What a step produced.
#[derive(Clone, Debug)]
pub enum NfaOutput {
    /// A completed match: leaf → events, leaves in order of their first event.
    Match { events: Vec<(u16, Vec<Event>)>, ids: Path },
    /// An expired partial match (`emit_timeouts`), with the time it expired.
    Timeout { events: Vec<(u16, Vec<Event>)>, ids: Path, at: i64 },
}

/// One key's state for one rule.
#[derive(Clone, Debug)]
pub struct NfaState {
    pub partial: JavaPq<Cs>,
    pub completed: JavaPq<Cs>,
    pub buffer: SharedBuffer,
    pub next_seq: u64,
    /// Runs in `partial` per automaton state (derived; rebuilt on restore).
    pub(crate) counts: Vec<u32>,
}

struct Ctx<'a> {
    nfa: &'a Nfa,
    event: &'a Event,
    aggs: Option<&'a [AggState]>,
}

impl EvalCtx for Ctx<'_> {
    fn event(&self) -> &Event {
        self.event
    }
    fn agg(&self, id: u32) -> Value {
        let kind = self.nfa.aggs[id as usize].kind;
        match self.aggs {
            Some(a) => a[id as usize].value(kind),
            None => AggState::new(kind).value(kind),
        }
    }
}

/// Per-event cache of history-free condition results (0 unknown, 1 false, 2 true).
pub struct CondCache {
    vals: Vec<u8>,
    /// Per state: 0 unknown, 1 changes runs, 2 leaves runs unchanged.
    inert: Vec<u8>,
}

impl CondCache {
    pub fn new(n: usize) -> Self {
        CondCache { vals: vec![0; n], inert: Vec::new() }
    }
    pub fn reset(&mut self, n: usize) {
        self.vals.clear();
        self.vals.resize(n, 0);
        self.inert.clear();
    }
    fn reset_states(&mut self, states: usize) {
        self.inert.clear();
        self.inert.resize(states, 0);
    }
}

fn check(nfa: &Nfa, c: &Cond, cx: &Ctx, cache: &mut CondCache) -> bool {
    match c {
        Cond::True => true,
        Cond::Expr(i) => {
            let i = *i as usize;
            if nfa.expr_reads_stages[i] {
                nfa.exprs[i].holds(cx)
            } else {
                match cache.vals[i] {
                    1 => false,
                    2 => true,
                    _ => {
                        let r = nfa.exprs[i].holds(cx);
                        cache.vals[i] = if r { 2 } else { 1 };
                        r
                    }
                }
            }
        }
        Cond::Not(x) => !check(nfa, x, cx, cache),
        Cond::And(a, b) => check(nfa, a, cx, cache) && check(nfa, b, cx, cache),
        Cond::Or(v) => v.iter().any(|x| check(nfa, x, cx, cache)),
    }
}

struct EdgeRef {
    action: Action,
    target: StateId,
    page: u16,
    /// For an ignore: the deadline the resulting run owes.
    owed: Option<i64>,
}

impl NfaState {
    pub fn new(nfa: &Nfa) -> NfaState {
        let mut partial = JavaPq::new();
        partial.add(Cs {
            state: nfa.start,
            node: None,
            version: Dewey::start(),
            start_ts: -1,
            prev_ts: -1,
            start_id: None,
            aggs: None,
            deadline: None,
        });
        let mut counts = vec![0; nfa.states.len()];
        counts[nfa.start as usize] = 1;
        NfaState { partial, completed: JavaPq::new(), buffer: SharedBuffer::default(), next_seq: 0, counts }
    }

    /// Recounts runs per state (after a rebuild of the partial heap).
    pub(crate) fn recount(&mut self, nfa: &Nfa) {
        self.counts.clear();
        self.counts.resize(nfa.states.len(), 0);
        for cs in self.partial.as_slice() {
            self.counts[cs.state as usize] += 1;
        }
    }

    /// Only the start state is alive: nothing to keep for this key.
    pub fn is_idle(&self) -> bool {
        self.completed.is_empty() && self.partial.len() == 1 && self.partial.as_slice()[0].node.is_none()
    }

    /// Number of live partial matches (excluding the start state).
    pub fn partial_count(&self) -> usize {
        self.partial.as_slice().iter().filter(|c| c.start_id.is_some()).count()
    }

    /// Earliest time at which `advance_time` would change something.
    pub fn next_deadline(&self, nfa: &Nfa) -> Option<i64> {
        let mut d: Option<i64> = None;
        if nfa.window > 0 {
            // The heap's head has the earliest start.
            if let Some(cs) = self.partial.peek().filter(|c| !nfa.is_start(c.state)) {
                d = Some(cs.start_ts.saturating_add(nfa.window));
            }
        }
        if nfa.has_stage_windows {
            for cs in self.partial.as_slice() {
                if nfa.is_start(cs.state) {
                    continue;
                }
                if let Some(w) = nfa.states[cs.state as usize].window {
                    let t = cs.prev_ts.saturating_add(w);
                    d = Some(d.map_or(t, |x| x.min(t)));
                }
                if let Some(t) = cs.deadline {
                    d = Some(d.map_or(t, |x| x.min(t)));
                }
            }
        }
        d
    }

    /// Flink's `process(event, timestamp)` (call `advance_time(ts)` first).
    pub fn process(&mut self, nfa: &Nfa, event: &Event, ts: i64, cache: &mut CondCache, out: &mut Vec<NfaOutput>) {
        let eid = EventId { t: ts, seq: self.next_seq };
        self.next_seq += 1;
        let mut registered = false;
        cache.reset(nfa.exprs.len());
        cache.reset_states(nfa.states.len());
        // Runs this event leaves unchanged keep their place: re-inserting an
        // unchanged prefix of a heap array in order reproduces it exactly, so
        // only the part from the first run the event changes is replayed.
        // Which states change runs is decided once per state (see `inert`).
        let mut changing = 0u32;
        let mut only_start = true;
        for st in 0..self.counts.len() {
            let c = self.counts[st];
            if c > 0 && !self.inert(nfa, st as StateId, event, cache) {
                changing += c;
                if st as StateId != nfa.start {
                    only_start = false;
                }
            }
        }
        if changing == 0 {
            return;
        }
        let mut arr = std::mem::take(&mut self.partial).into_vec();
        let j = if only_start && arr.last().is_some_and(|c| c.state == nfa.start) && changing == 1 {
            arr.len() - 1
        } else {
            // The smallest index of a changing run: scan from the end (new runs
            // sit at the end) until all `changing` runs are found.
            let mut found = 0;
            let mut j = arr.len();
            for (i, cs) in arr.iter().enumerate().rev() {
                if !self.inert(nfa, cs.state, event, cache) {
                    found += 1;
                    j = i;
                    if found == changing {
                        break;
                    }
                }
            }
            j
        };
        let suffix = arr.split_off(j);
        for cs in &suffix {
            self.counts[cs.state as usize] -= 1;
        }
        let mut new_partial = JavaPq::from_array(arr);
        let mut potential = JavaPq::new();
        let mut successors = Vec::new();
        for cs in suffix {
            successors.clear();
            if !self.compute_next_states(nfa, &cs, event, ts, eid, &mut registered, cache, &mut successors) {
                // Unchanged by this event (a lone self-ignore): Flink re-locks and
                // releases the same node and version, a no-op; keep it as is.
                self.counts[cs.state as usize] += 1;
                new_partial.add(cs);
                continue;
            }
            let discard = successors.iter().any(|s| nfa.kind(s.state) == StateKind::Stop);
            for s in successors.drain(..) {
                match nfa.kind(s.state) {
                    StateKind::Final => potential.add(s),
                    _ if discard => {
                        // A stop state was reached: this branch and all it kept die.
                        if let Some(n) = s.node {
                            self.buffer.release_node(n, &s.version);
                        }
                    }
                    _ => {
                        self.counts[s.state as usize] += 1;
                        new_partial.add(s)
                    }
                }
            }
        }
        let pruned = self.process_matches(nfa, potential, &mut new_partial, out);
        self.partial = new_partial;
        if pruned {
            self.recount(nfa);
        }
        if registered {
            self.buffer.release_event(eid);
        }
    }

    /// Does this event leave every run resting in `state` unchanged? Decided
    /// once per state and event, and only where no condition reachable from
    /// the state reads the run's history (otherwise: no, check run by run).
    fn inert(&self, nfa: &Nfa, state: StateId, event: &Event, cache: &mut CondCache) -> bool {
        if !nfa.history_free[state as usize] {
            return false;
        }
        if cache.inert[state as usize] != 0 {
            return cache.inert[state as usize] == 2;
        }
        let cx = Ctx { nfa, event, aggs: None };
        let is_start = nfa.is_start(state);
        let mut stack = vec![(state, 0u32)];
        let mut path = ProceedPath::default();
        let (mut takes, mut ignores, mut self_ignores) = (0, 0, 0);
        while let Some((s, d)) = stack.pop() {
            path.visit(nfa, s, d);
            for t in &nfa.states[s as usize].transitions {
                if check(nfa, &t.cond, &cx, cache) {
                    match t.action {
                        Action::Proceed if path.may_enter(nfa, t.target) => stack.push((t.target, d + 1)),
                        Action::Proceed => {}
                        Action::Take => takes += 1,
                        Action::Ignore if t.target == state => self_ignores += 1,
                        Action::Ignore => ignores += 1,
                    }
                }
            }
        }
        let inert = takes == 0 && ignores == 0 && (is_start || self_ignores == 1);
        cache.inert[state as usize] = if inert { 2 } else { 1 };
        inert
    }

    /// Flink's `advanceTime(timestamp)`: expire windows, complete pending
    /// trailing absences, release held-back matches.
    pub fn advance_time(&mut self, nfa: &Nfa, ts: i64, out: &mut Vec<NfaOutput>) {
        let old = std::mem::take(&mut self.partial).into_vec();
        let mut new_partial = JavaPq::new();
        let mut potential = JavaPq::new();
        for cs in old {
            let is_start = nfa.is_start(cs.state);
            let stage_w = nfa.states[cs.state as usize].window;
            let owed = !is_start && cs.deadline.is_some_and(|d| ts >= d);
            let by_prev = owed || (!is_start && stage_w.is_some_and(|w| w > 0 && ts.saturating_sub(cs.prev_ts) >= w));
            let by_first = !is_start && nfa.window > 0 && ts.saturating_sub(cs.start_ts) >= nfa.window;
            if by_prev || by_first {
                if nfa.kind(cs.state) == StateKind::Pending {
                    potential.add(cs);
                    continue;
                }
                if nfa.emit_timeouts {
                    if let Some(n) = cs.node {
                        let paths = self.buffer.extract_paths(n, &cs.version);
                        if let Some(p) = paths.into_iter().next() {
                            let mut at = if by_prev { i64::MAX } else { cs.start_ts + nfa.window };
                            if let Some(w) = stage_w.filter(|w| ts.saturating_sub(cs.prev_ts) >= *w) {
                                at = at.min(cs.prev_ts + w);
                            }
                            if let Some(d) = cs.deadline.filter(|d| ts >= *d) {
                                at = at.min(d);
                            }
                            out.push(NfaOutput::Timeout { events: self.materialize(&p), ids: p, at });
                        }
                    }
                }
                if let Some(n) = cs.node {
                    self.buffer.release_node(n, &cs.version);
                }
            } else {
                new_partial.add(cs);
            }
        }
        self.process_matches(nfa, potential, &mut new_partial, out);
        self.partial = new_partial;
        self.recount(nfa);
    }

    fn materialize(&self, p: &Path) -> Vec<(u16, Vec<Event>)> {
        p.iter()
            .map(|(page, ids)| (*page, ids.iter().filter_map(|i| self.buffer.event(*i).cloned()).collect()))
            .collect()
    }

    /// Returns whether partial matches were pruned.
    fn process_matches(&mut self, nfa: &Nfa, potential: JavaPq<Cs>, partial: &mut JavaPq<Cs>, out: &mut Vec<NfaOutput>) -> bool {
        let mut pruned = false;
        for m in potential.into_vec() {
            self.completed.add(m);
        }
        let skip = nfa.after_match != AfterMatch::NoSkip;
        let mut emitted: Vec<Path> = Vec::new();
        while let Some(earliest) = self.completed.peek() {
            if skip {
                if let Some(p) = partial.peek() {
                    if earliest.pq_cmp(p) == Ordering::Greater {
                        break;
                    }
                }
            }
            let m = self.completed.poll().unwrap();
            let Some(node) = m.node else { continue };
            let paths = self.buffer.extract_paths(node, &m.version);
            if let Some((pruning, inclusive)) = pruning_id(nfa.after_match, &paths) {
                let pred = |c: &Cs| match c.start_id {
                    Some(s) => {
                        if inclusive {
                            s <= pruning
                        } else {
                            s < pruning
                        }
                    }
                    None => false,
                };
                for c in partial.remove_where(pred) {
                    pruned = true;
                    if let Some(n) = c.node {
                        self.buffer.release_node(n, &c.version);
                    }
                }
                for c in self.completed.remove_where(pred) {
                    if let Some(n) = c.node {
                        self.buffer.release_node(n, &c.version);
                    }
                }
            }
            if let Some(first) = paths.into_iter().next() {
                // A match identical to one already emitted for this event is emitted once.
                if !emitted.contains(&first) {
                    out.push(NfaOutput::Match { events: self.materialize(&first), ids: first.clone() });
                    emitted.push(first);
                }
            }
            self.buffer.release_node(node, &m.version);
        }
        pruned
    }

    #[allow(clippy::too_many_arguments)]
    fn compute_next_states(
        &mut self,
        nfa: &Nfa,
        cs: &Cs,
        event: &Event,
        ts: i64,
        eid: EventId,
        registered: &mut bool,
        cache: &mut CondCache,
        out: &mut Vec<Cs>,
    ) -> bool {
        let cx = Ctx { nfa, event, aggs: cs.aggs.as_deref().map(|v| v.as_slice()) };
        let is_start = nfa.is_start(cs.state);
        // Decision graph: depth-first over PROCEED edges, collecting TAKE/IGNORE.
        let mut edges: Vec<EdgeRef> = Vec::new();
        let (mut n_take, mut n_ignore) = (0i64, 0i64);
        let min = |a: Option<i64>, b: Option<i64>| match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        // (state, deadline owed for windows of states proceeded through)
        let owed0 = if is_start { None } else { cs.deadline };
        let mut stack: Vec<(StateId, Option<i64>, u32)> = vec![(cs.state, owed0, 0)];
        let mut path = ProceedPath::default();
        while let Some((s, owed, d)) = stack.pop() {
            path.visit(nfa, s, d);
            let own = if is_start { None } else { nfa.states[s as usize].window.map(|w| cs.prev_ts.saturating_add(w)) };
            for t in &nfa.states[s as usize].transitions {
                if !check(nfa, &t.cond, &cx, cache) {
                    continue;
                }
                match t.action {
                    // Proceeding skips this state's stage: its window stays owed.
                    Action::Proceed if path.may_enter(nfa, t.target) => stack.push((t.target, min(owed, own), d + 1)),
                    Action::Proceed => {}
                    Action::Take => {
                        // Stage windows are enforced on every take (the spec's
                        // rule; Flink checks only while resting in the stage).
                        if min(owed, own).is_some_and(|d| ts >= d) {
                            continue;
                        }
                        n_take += 1;
                        edges.push(EdgeRef { action: t.action, target: t.target, page: t.page, owed: None });
                    }
                    Action::Ignore => {
                        if t.target != cs.state {
                            n_ignore += 1;
                        }
                        edges.push(EdgeRef { action: t.action, target: t.target, page: t.page, owed });
                    }
                }
            }
        }
        if !is_start && n_take == 0 && n_ignore == 0 && edges.len() == 1 {
            // Only a self-ignore: the successor equals `cs` (same node, same version).
            return false;
        }
        let inc = if n_take == 0 && n_ignore == 0 { 0 } else { n_ignore + n_take.max(1) };
        let mut take_to_visit = (n_take - 1).max(0);
        let mut ignore_to_visit = n_ignore;
        let total_take_to_skip = (n_take - 1).max(0);
        for e in &edges {
            match e.action {
                Action::Ignore => {
                    if is_start {
                        continue;
                    }
                    let version = if e.target == cs.state {
                        cs.version.increase(inc)
                    } else {
                        let v = cs.version.increase(total_take_to_skip + ignore_to_visit).add_stage();
                        ignore_to_visit -= 1;
                        v
                    };
                    self.add_cs(out, Cs { state: e.target, version, deadline: e.owed, ..cs.clone() });
                }
                Action::Take => {
                    let cur_version = cs.version.increase(take_to_visit);
                    let next_version = cur_version.add_stage();
                    take_to_visit -= 1;
                    if !*registered {
                        self.buffer.register_event(eid, event);
                        *registered = true;
                    }
                    let node = self.buffer.put(e.page, eid, cs.node, &cur_version);
                    let (start_ts, start_id) = if is_start { (ts, Some(eid)) } else { (cs.start_ts, cs.start_id) };
                    let aggs = self.updated_aggs(nfa, cs, e.page, event);
                    let next = Cs {
                        state: e.target,
                        node: Some(node),
                        version: next_version,
                        start_ts,
                        prev_ts: ts,
                        start_id,
                        aggs,
                        deadline: None,
                    };
                    let reaches_final = self.final_after_proceed(nfa, e.target, &cx, cache);
                    if reaches_final {
                        let fin = Cs { state: nfa.final_state, ..next.clone() };
                        self.add_cs(out, next);
                        self.add_cs(out, fin);
                    } else {
                        self.add_cs(out, next);
                    }
                }
                Action::Proceed => unreachable!(),
            }
        }
        if is_start {
            out.push(Cs {
                state: cs.state,
                node: None,
                version: cs.version.increase(inc),
                start_ts: -1,
                prev_ts: -1,
                start_id: None,
                aggs: None,
                deadline: None,
            });
        }
        if let Some(n) = cs.node {
            self.buffer.release_node(n, &cs.version);
        }
        true
    }

    fn add_cs(&mut self, out: &mut Vec<Cs>, cs: Cs) {
        if let Some(n) = cs.node {
            self.buffer.lock_node(n, &cs.version);
        }
        out.push(cs);
    }

    fn updated_aggs(&self, nfa: &Nfa, cs: &Cs, page: u16, event: &Event) -> Option<Arc<Vec<AggState>>> {
        let slots = &nfa.aggs_by_leaf[page as usize];
        if slots.is_empty() {
            return cs.aggs.clone();
        }
        let mut v: Arc<Vec<AggState>> = match &cs.aggs {
            Some(a) => a.clone(),
            None => Arc::new(nfa.aggs.iter().map(|a| AggState::new(a.kind)).collect()),
        };
        let m = Arc::make_mut(&mut v);
        for &s in slots {
            m[s as usize].update(nfa.aggs[s as usize].kind, event);
        }
        Some(v)
    }

    fn final_after_proceed(&self, nfa: &Nfa, from: StateId, cx: &Ctx, cache: &mut CondCache) -> bool {
        let mut stack = vec![(from, 0u32)];
        let mut path = ProceedPath::default();
        while let Some((s, d)) = stack.pop() {
            path.visit(nfa, s, d);
            for t in &nfa.states[s as usize].transitions {
                if t.action == Action::Proceed && path.may_enter(nfa, t.target) && check(nfa, &t.cond, cx, cache) {
                    if nfa.kind(t.target) == StateKind::Final {
                        return true;
                    }
                    stack.push((t.target, d + 1));
                }
            }
        }
        false
    }
}

/// The pruning event of a match and whether starts equal to it are pruned.
fn pruning_id(am: AfterMatch, paths: &[Path]) -> Option<(EventId, bool)> {
    let mut id: Option<EventId> = None;
    match am {
        AfterMatch::NoSkip => None,
        AfterMatch::SkipToNext => {
            for p in paths {
                for (_, l) in p {
                    if let Some(f) = l.first() {
                        id = Some(id.map_or(*f, |x| x.min(*f)));
                    }
                }
            }
            id.map(|i| (i, true))
        }
        AfterMatch::SkipPastLastEvent => {
            for p in paths {
                for (_, l) in p {
                    if let Some(f) = l.last() {
                        id = Some(id.map_or(*f, |x| x.max(*f)));
                    }
                }
            }
            id.map(|i| (i, true))
        }
        AfterMatch::SkipToFirst(leaf) | AfterMatch::SkipToLast(leaf) => {
            for p in paths {
                if let Some((_, l)) = p.iter().find(|(pg, _)| *pg == leaf) {
                    let e = if matches!(am, AfterMatch::SkipToFirst(_)) { l.first() } else { l.last() };
                    if let Some(f) = e {
                        id = Some(id.map_or(*f, |x| x.max(*f)));
                    }
                }
            }
            id.map(|i| (i, false))
        }
    }
}

impl Nfa {
    /// Would the start state take this event (through PROCEED edges)? A key
    /// with no live state needs an event only then.
    pub fn can_start(&self, event: &Event, cache: &mut CondCache) -> bool {
        cache.reset(self.exprs.len());
        let cx = Ctx { nfa: self, event, aggs: None };
        let mut stack = vec![(self.start, 0u32)];
        let mut path = ProceedPath::default();
        while let Some((s, d)) = stack.pop() {
            path.visit(self, s, d);
            for t in &self.states[s as usize].transitions {
                if check(self, &t.cond, &cx, cache) {
                    match t.action {
                        Action::Take => return true,
                        Action::Proceed if path.may_enter(self, t.target) => stack.push((t.target, d + 1)),
                        Action::Proceed => {}
                        Action::Ignore => {}
                    }
                }
            }
        }
        false
    }
}
