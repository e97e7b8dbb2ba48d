//! Snapshots: a key's automaton state, or the whole engine, as a versioned
//! serde document. A snapshot written by one version of Cepheid must load in
//! the next (`tests/fixtures/` pins each format version).
//!
//! Everything that decides future results is kept: the partial and completed
//! heaps in their exact array order, Dewey versions, the shared buffer's
//! nodes, edges and reference counts, the per-key event counter, aggregate
//! slots; events are kept as their text and decoded again on restore.

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use xxhash_rust::xxh3::xxh3_64;

use cepheid_rules::AggState;
use cepheid_types::{EventDecoder, Value};

use crate::nfa::buffer::{Edge, EventId, Node, NodeId, SharedBuffer};
use crate::nfa::dewey::Dewey;
use crate::nfa::model::Nfa;
use crate::nfa::pq::JavaPq;
use crate::nfa::run::Cs;
use crate::nfa::NfaState;

/// The current snapshot format.
pub const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CsSnap {
    pub state: u32,
    pub node: Option<NodeId>,
    pub version: Vec<u32>,
    pub start_ts: i64,
    pub prev_ts: i64,
    pub start_id: Option<EventId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggs: Option<Vec<AggState>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventSnap {
    pub id: EventId,
    pub refs: u32,
    /// The event's own time (its time field), ms.
    pub time: i64,
    /// The event as received.
    pub raw: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdgeSnap {
    pub target: Option<NodeId>,
    pub version: Vec<u32>,
    pub refs: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeSnap {
    pub id: NodeId,
    pub refs: u32,
    pub edges: Vec<EdgeSnap>,
}

/// One key's state for one rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeySnapshot {
    pub format: u32,
    /// Fingerprint of the automaton the state belongs to.
    pub automaton: String,
    pub next_seq: u64,
    pub partial: Vec<CsSnap>,
    pub completed: Vec<CsSnap>,
    pub events: Vec<EventSnap>,
    pub nodes: Vec<NodeSnap>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot format {0} is newer than this build understands (up to {FORMAT})")]
    NewerFormat(u32),
    #[error("snapshot belongs to a different automaton ({found}, expected {expected}); the rule changed")]
    Automaton { found: String, expected: String },
    #[error("snapshot event {id:?} cannot be decoded: {msg}")]
    Event { id: EventId, msg: String },
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(String),
}

/// A stable fingerprint of a compiled automaton (state names, kinds, transitions).
pub fn fingerprint(nfa: &Nfa) -> String {
    let mut s = String::new();
    for st in &nfa.states {
        s.push_str(&format!("{}|{:?}|{:?};", st.name, st.kind, st.window));
        for t in &st.transitions {
            s.push_str(&format!("{:?}>{}@{}:{:?},", t.action, t.target, t.page, t.cond));
        }
    }
    s.push_str(&format!("w{}", nfa.window));
    format!("{:016x}", xxh3_64(s.as_bytes()))
}

fn cs_snap(c: &Cs) -> CsSnap {
    CsSnap {
        state: c.state,
        node: c.node,
        version: c.version.0.to_vec(),
        start_ts: c.start_ts,
        prev_ts: c.prev_ts,
        start_id: c.start_id,
        aggs: c.aggs.as_ref().map(|a| a.as_ref().clone()),
        deadline: c.deadline,
    }
}

fn cs_from(c: CsSnap, nfa: &Nfa) -> Result<Cs, SnapshotError> {
    if c.state as usize >= nfa.states.len() || c.version.is_empty() {
        return Err(SnapshotError::Inconsistent(format!("bad partial match state {}", c.state)));
    }
    Ok(Cs {
        state: c.state,
        node: c.node,
        version: Dewey(SmallVec::from_vec(c.version)),
        start_ts: c.start_ts,
        prev_ts: c.prev_ts,
        start_id: c.start_id,
        aggs: c.aggs.map(std::sync::Arc::new),
        deadline: c.deadline,
    })
}

impl NfaState {
    /// This state as a snapshot document.
    pub fn snapshot(&self, nfa: &Nfa) -> KeySnapshot {
        self.snapshot_as(fingerprint(nfa))
    }

    /// As [`NfaState::snapshot`], with the automaton's [`fingerprint`] already known.
    pub fn snapshot_as(&self, automaton: String) -> KeySnapshot {
        let mut events: Vec<EventSnap> = self
            .buffer
            .events
            .iter()
            .map(|(id, (e, refs))| EventSnap { id: *id, refs: *refs, time: e.time(), raw: e.raw().to_string() })
            .collect();
        events.sort_by_key(|e| e.id);
        let mut nodes: Vec<NodeSnap> = self
            .buffer
            .nodes
            .iter()
            .map(|(id, n)| NodeSnap {
                id: *id,
                refs: n.refs,
                edges: n
                    .edges
                    .iter()
                    .map(|e| EdgeSnap { target: e.target, version: e.version.0.to_vec(), refs: e.refs })
                    .collect(),
            })
            .collect();
        nodes.sort_by_key(|n| (n.id.event, n.id.page));
        KeySnapshot {
            format: FORMAT,
            automaton,
            next_seq: self.next_seq,
            partial: self.partial.as_slice().iter().map(cs_snap).collect(),
            completed: self.completed.as_slice().iter().map(cs_snap).collect(),
            events,
            nodes,
        }
    }

    /// Restores a state; events are decoded again with `decoder`.
    pub fn restore(snap: KeySnapshot, nfa: &Nfa, decoder: &EventDecoder) -> Result<NfaState, SnapshotError> {
        NfaState::restore_as(snap, nfa, &fingerprint(nfa), decoder)
    }

    /// As [`NfaState::restore`], with the automaton's [`fingerprint`] already known.
    pub fn restore_as(snap: KeySnapshot, nfa: &Nfa, expected: &str, decoder: &EventDecoder) -> Result<NfaState, SnapshotError> {
        if snap.format > FORMAT {
            return Err(SnapshotError::NewerFormat(snap.format));
        }
        if snap.automaton != expected {
            return Err(SnapshotError::Automaton { found: snap.automaton, expected: expected.to_string() });
        }
        let mut buffer = SharedBuffer::default();
        for e in snap.events {
            let ev = decoder.decode_with_time(&e.raw, e.time).map_err(|m| SnapshotError::Event { id: e.id, msg: m.to_string() })?;
            buffer.events.insert(e.id, (ev, e.refs));
        }
        for n in snap.nodes {
            let edges = n
                .edges
                .into_iter()
                .map(|e| Edge { target: e.target, version: Dewey(SmallVec::from_vec(e.version)), refs: e.refs })
                .collect();
            buffer.nodes.insert(n.id, Node { refs: n.refs, edges });
        }
        let partial = snap.partial.into_iter().map(|c| cs_from(c, nfa)).collect::<Result<Vec<_>, _>>()?;
        let completed = snap.completed.into_iter().map(|c| cs_from(c, nfa)).collect::<Result<Vec<_>, _>>()?;
        let mut st = NfaState {
            partial: JavaPq::from_array(partial),
            completed: JavaPq::from_array(completed),
            buffer,
            next_seq: snap.next_seq,
            counts: Vec::new(),
        };
        st.recount(nfa);
        Ok(st)
    }
}

/// Key values in a serialisable form.
pub fn key_to_json(k: &crate::key::KeyVals) -> Vec<serde_json::Value> {
    k.0.iter().map(Value::to_json).collect()
}

pub fn key_from_json(v: &[serde_json::Value]) -> crate::key::KeyVals {
    crate::key::KeyVals(v.iter().map(Value::from_json).collect())
}
