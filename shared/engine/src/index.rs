//! Rule index: which rules can use an event, without evaluating every rule.
//!
//! Each rule gets at most one *gate*: a field and the values it must have.
//! - A **filter gate** comes from an equality or `IN` conjunct of the rule's
//!   `filter`: an event without one of those values is not in the rule's
//!   stream at all.
//! - A **start gate** comes from conjuncts shared by every take reachable from
//!   the start state: a key with no live state needs the event only if the
//!   start state can take it. Keys with live state see every event of the
//!   rule's stream (strict contiguity and `notNext` depend on it), so the
//!   engine also looks up which rules hold state for the event's key.
//!
//! Results never change: a gate only skips rules that would have done nothing.

use std::collections::HashMap;

use cepheid_rules::{CmpOp, Expr};
use cepheid_types::{Event, FieldId, Value};
use rustc_hash::FxHashMap;
use smallvec::smallvec;

use crate::key::KeyVals;
use crate::nfa::model::{Action, Cond, Nfa};

/// Where a rule's gate comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Gate {
    None,
    Filter(FieldId, Vec<Value>),
    Start(FieldId, Vec<Value>),
}

/// Equality / IN atoms an expression requires to hold.
pub fn required_atoms(e: &Expr) -> Vec<(FieldId, Vec<Value>)> {
    match e {
        Expr::And(list) => list.iter().flat_map(required_atoms).collect(),
        Expr::Cmp(CmpOp::Eq, a, b) => match (a.as_ref(), b.as_ref()) {
            (Expr::Field(f), Expr::Lit(v)) | (Expr::Lit(v), Expr::Field(f)) if !v.is_null() => vec![(*f, vec![v.clone()])],
            _ => Vec::new(),
        },
        Expr::InList { expr, list, negated: false } => match expr.as_ref() {
            Expr::Field(f) => {
                let lits: Option<Vec<Value>> = list
                    .iter()
                    .map(|x| match x {
                        Expr::Lit(v) if !v.is_null() => Some(v.clone()),
                        _ => None,
                    })
                    .collect();
                lits.map(|l| vec![(*f, l)]).unwrap_or_default()
            }
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

fn cond_atoms(c: &Cond, nfa: &Nfa) -> Vec<(FieldId, Vec<Value>)> {
    match c {
        Cond::Expr(i) => required_atoms(&nfa.exprs[*i as usize]),
        Cond::And(a, b) => {
            let mut v = cond_atoms(a, nfa);
            v.extend(cond_atoms(b, nfa));
            v
        }
        _ => Vec::new(),
    }
}

/// The gate of a rule: its filter's atom, else an atom every start take needs.
pub fn gate_for(filter: Option<&Expr>, nfa: &Nfa) -> Gate {
    if let Some(f) = filter {
        if let Some((field, vals)) = required_atoms(f).into_iter().next() {
            return Gate::Filter(field, vals);
        }
    }
    // Take edges reachable from the start state through PROCEED, with the
    // conditions along the way (a PROCEED condition is required too).
    // A path's conditions: per field, the values it must equal one of.
    type Conds = Vec<(FieldId, Vec<Value>)>;
    let mut takes: Vec<Conds> = Vec::new();
    let mut stack: Vec<(u32, Conds)> = vec![(nfa.start, Vec::new())];
    let mut guard = 0;
    while let Some((s, path)) = stack.pop() {
        guard += 1;
        if guard > 10_000 {
            return Gate::None;
        }
        for t in &nfa.states[s as usize].transitions {
            let mut atoms = path.clone();
            atoms.extend(cond_atoms(&t.cond, nfa));
            match t.action {
                Action::Take => takes.push(atoms),
                Action::Proceed => stack.push((t.target, atoms)),
                Action::Ignore => {}
            }
        }
    }
    if takes.is_empty() {
        return Gate::None;
    }
    // A field every take constrains; the gate admits the union of their values.
    for (field, _) in &takes[0] {
        let mut values: Vec<Value> = Vec::new();
        let mut all = true;
        for t in &takes {
            match t.iter().find(|(f, _)| f == field) {
                Some((_, vs)) => {
                    for v in vs {
                        if !values.iter().any(|x| x.sql_eq(v) == Some(true)) {
                            values.push(v.clone());
                        }
                    }
                }
                None => {
                    all = false;
                    break;
                }
            }
        }
        if all {
            return Gate::Start(*field, values);
        }
    }
    Gate::None
}

fn vkey(v: &Value) -> KeyVals {
    KeyVals(smallvec![v.clone()])
}

/// Rule slots by gate value.
#[derive(Clone, Default)]
pub struct RuleIndex {
    /// Rules without a gate: always candidates.
    ungated: Vec<usize>,
    /// field → value → rules (filter gates).
    filter: FxHashMap<FieldId, FxHashMap<KeyVals, Vec<usize>>>,
    /// field → value → rules (start gates).
    start: FxHashMap<FieldId, FxHashMap<KeyVals, Vec<usize>>>,
    gates: HashMap<usize, Gate>,
}

impl RuleIndex {
    pub fn insert(&mut self, slot: usize, gate: Gate) {
        self.remove(slot);
        match &gate {
            Gate::None => self.ungated.push(slot),
            Gate::Filter(f, vs) | Gate::Start(f, vs) => {
                let map = if matches!(gate, Gate::Filter(..)) { &mut self.filter } else { &mut self.start };
                let by_val = map.entry(*f).or_default();
                for v in vs {
                    by_val.entry(vkey(v)).or_default().push(slot);
                }
            }
        }
        self.gates.insert(slot, gate);
    }

    pub fn remove(&mut self, slot: usize) {
        let Some(g) = self.gates.remove(&slot) else { return };
        match &g {
            Gate::None => self.ungated.retain(|s| *s != slot),
            Gate::Filter(f, vs) | Gate::Start(f, vs) => {
                let map = if matches!(g, Gate::Filter(..)) { &mut self.filter } else { &mut self.start };
                if let Some(by_val) = map.get_mut(f) {
                    for v in vs {
                        if let Some(list) = by_val.get_mut(&vkey(v)) {
                            list.retain(|s| *s != slot);
                            if list.is_empty() {
                                by_val.remove(&vkey(v));
                            }
                        }
                    }
                    if by_val.is_empty() {
                        map.remove(f);
                    }
                }
            }
        }
    }

    pub fn gate(&self, slot: usize) -> Option<&Gate> {
        self.gates.get(&slot)
    }

    /// Candidate rules for an event, besides start-gated rules holding state
    /// for the event's key (the engine adds those). Sorted, no duplicates.
    pub fn candidates(&self, ev: &Event, out: &mut Vec<usize>) {
        out.clear();
        out.extend_from_slice(&self.ungated);
        for map in [&self.filter, &self.start] {
            for (f, by_val) in map {
                let v = ev.get(*f);
                if v.is_null() {
                    continue;
                }
                if let Some(list) = by_val.get(&vkey(v)) {
                    out.extend_from_slice(list);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
    }

    pub fn start_gated(&self) -> impl Iterator<Item = usize> + '_ {
        self.gates.iter().filter(|(_, g)| matches!(g, Gate::Start(..))).map(|(s, _)| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cepheid_rules::{compile, parse_rule_json};
    use cepheid_types::FieldRegistry;

    fn gate(rule: &str) -> (Gate, FieldRegistry) {
        let mut reg = FieldRegistry::new();
        let r = compile(&parse_rule_json(rule).unwrap(), &mut reg).unwrap();
        let nfa = crate::nfa::build_nfa(&r);
        (gate_for(r.filter.as_deref(), &nfa), reg)
    }

    #[test]
    fn gates() {
        let (g, reg) = gate(r#"{"id":"r","version":1,"filter":"merchant = 7 AND amount > 3","pattern":[{"name":"a"}]}"#);
        assert_eq!(g, Gate::Filter(reg.get("merchant").unwrap(), vec![Value::Int(7)]));
        let (g, reg) = gate(r#"{"id":"r","version":1,"pattern":[{"name":"a","where":"kind IN ('x','y') AND p > 1"},{"name":"b"}]}"#);
        assert_eq!(g, Gate::Start(reg.get("kind").unwrap(), vec![Value::str("x"), Value::str("y")]));
        // An optional first stage: the second stage's takes count too.
        let (g, reg) = gate(r#"{"id":"r","version":1,"pattern":[{"name":"a","where":"kind = 'x'","optional":true},{"name":"b","where":"kind = 'z'"}]}"#);
        assert_eq!(g, Gate::Start(reg.get("kind").unwrap(), vec![Value::str("x"), Value::str("z")]));
        let (g, _) = gate(r#"{"id":"r","version":1,"pattern":[{"name":"a","where":"kind = 'x' OR p > 1"}]}"#);
        assert_eq!(g, Gate::None);
    }
}
