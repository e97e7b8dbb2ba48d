//! The compiled automaton: states with ordered transitions (the order is part
//! of the semantics — it fixes Dewey numbers and therefore reported paths).

use std::sync::Arc;

use cepheid_rules::{AfterMatch, AggSpec, Expr};

pub type StateId = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKind {
    Start,
    Normal,
    Final,
    Stop,
    Pending,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Take,
    Ignore,
    Proceed,
}

/// A transition condition, built from stage conditions.
#[derive(Clone, Debug)]
pub enum Cond {
    True,
    /// Index into [`Nfa::exprs`].
    Expr(u32),
    Not(Box<Cond>),
    And(Box<Cond>, Box<Cond>),
    /// Any of (used by `all` stages: "some empty inner stage takes it").
    Or(Vec<Cond>),
}

impl Cond {
    pub fn and(a: Cond, b: Cond) -> Cond {
        Cond::And(Box::new(a), Box::new(b))
    }
    #[allow(clippy::should_implement_trait)]
    pub fn not(a: Cond) -> Cond {
        Cond::Not(Box::new(a))
    }
}

#[derive(Clone, Debug)]
pub struct Transition {
    pub action: Action,
    pub source: StateId,
    pub target: StateId,
    pub cond: Cond,
    /// For TAKE: the leaf stage the event is recorded under.
    pub page: u16,
}

#[derive(Clone, Debug)]
pub struct State {
    /// Unique internal name (`stage`, `stage:0`, …) as Flink names them.
    pub name: String,
    pub kind: StateKind,
    pub transitions: Vec<Transition>,
    /// Stage window (ms) checked against the previous taken event.
    pub window: Option<i64>,
}

/// One rule's automaton.
#[derive(Clone, Debug)]
pub struct Nfa {
    pub states: Vec<State>,
    pub start: StateId,
    pub final_state: StateId,
    /// Rule window in ms (0 = none).
    pub window: i64,
    pub exprs: Vec<Arc<Expr>>,
    /// Per expression: does it read stage aggregates?
    pub expr_reads_stages: Vec<bool>,
    pub aggs: Vec<AggSpec>,
    /// Leaf → aggregate slots fed by that leaf.
    pub aggs_by_leaf: Vec<Vec<u32>>,
    pub after_match: AfterMatch,
    pub emit_timeouts: bool,
    /// Leaf names, for output.
    pub leaf_names: Vec<String>,
    pub leaf_negated: Vec<bool>,
    /// Per state: no condition reachable from it (through PROCEED) reads stage history.
    pub history_free: Vec<bool>,
    /// Some state has a stage window.
    pub has_stage_windows: bool,
    /// PROCEED edges form a cycle (e.g. a group repeating without bound whose every stage can
    /// be passed without an event). Flink's NFA follows such a cycle for ever once it enters
    /// it; walks over PROCEED edges here then do not enter a state already on their path.
    /// Only these rules track a path, and where Flink returns its walks never come back to a
    /// state on their path, so their results are Flink's.
    pub proceed_cycles: bool,
}

/// The states on a walk's current path over PROCEED edges (tracked only when the NFA has
/// PROCEED cycles): a walk pops `(state, depth)` entries depth-first, so the path to an entry
/// at depth `d` is `path[..d]` when it is popped.
#[derive(Default)]
pub struct ProceedPath {
    path: Vec<StateId>,
}

impl ProceedPath {
    /// Records `s`, popped at depth `d`.
    #[inline]
    pub fn visit(&mut self, nfa: &Nfa, s: StateId, d: u32) {
        if nfa.proceed_cycles {
            self.path.truncate(d as usize);
            self.path.push(s);
        }
    }
    /// May a walk proceed into `t` from the state visited last?
    #[inline]
    pub fn may_enter(&self, nfa: &Nfa, t: StateId) -> bool {
        !nfa.proceed_cycles || !self.path.contains(&t)
    }
}

impl Nfa {
    #[inline]
    pub fn kind(&self, s: StateId) -> StateKind {
        self.states[s as usize].kind
    }
    #[inline]
    pub fn is_start(&self, s: StateId) -> bool {
        self.kind(s) == StateKind::Start
    }
}
