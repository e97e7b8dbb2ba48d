//! The shared buffer (Flink's `SharedBuffer` + `SharedBufferAccessor`): each
//! event is stored once; partial matches are paths of versioned edges between
//! `(event, stage)` nodes, reference counted so that a node lives exactly as
//! long as some run can still reach it.

use std::cmp::Ordering;

use cepheid_types::Event;
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use super::dewey::Dewey;

/// Event identity inside one key's NFA: time first, then arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct EventId {
    pub t: i64,
    pub seq: u64,
}

impl Ord for EventId {
    fn cmp(&self, o: &Self) -> Ordering {
        self.t.cmp(&o.t).then(self.seq.cmp(&o.seq))
    }
}
impl PartialOrd for EventId {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// A buffer node: an event taken into a stage (leaf index = Flink's page).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NodeId {
    pub event: EventId,
    pub page: u16,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Edge {
    pub target: Option<NodeId>,
    pub version: Dewey,
    pub refs: u32,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Node {
    pub refs: u32,
    /// One edge inline: most nodes have one (an edge is 72 bytes, and a
    /// node is a hash-map bucket, so a second inline edge cost every node 72
    /// bytes; nodes taken by many runs, as of a `times` stage, spill to the
    /// heap either way). BENCHMARKS.md, "Memory".
    pub edges: SmallVec<[Edge; 1]>,
}

/// Stage → events of one path, stages ordered by their earliest event.
pub type Path = Vec<(u16, Vec<EventId>)>;

#[derive(Clone, Debug, Default)]
pub struct SharedBuffer {
    pub(crate) events: FxHashMap<EventId, (Event, u32)>,
    pub(crate) nodes: FxHashMap<NodeId, Node>,
}

impl SharedBuffer {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.events.is_empty()
    }

    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Registers the event under processing (one reference, released by
    /// [`SharedBuffer::release_event`] at the end of the step).
    pub fn register_event(&mut self, id: EventId, ev: &Event) {
        self.events.entry(id).or_insert_with(|| (ev.clone(), 0)).1 += 1;
    }

    pub fn release_event(&mut self, id: EventId) {
        if let Some(e) = self.events.get_mut(&id) {
            if e.1 <= 1 {
                self.events.remove(&id);
            } else {
                e.1 -= 1;
            }
        }
    }

    fn lock_event(&mut self, id: EventId) {
        if let Some(e) = self.events.get_mut(&id) {
            e.1 += 1;
        }
    }

    pub fn event(&self, id: EventId) -> Option<&Event> {
        self.events.get(&id).map(|e| &e.0)
    }

    /// `put`: adds an edge from `(event, page)` back to `prev` under `version`.
    pub fn put(&mut self, page: u16, event: EventId, prev: Option<NodeId>, version: &Dewey) -> NodeId {
        if let Some(p) = prev {
            self.lock_node(p, version);
        }
        let id = NodeId { event, page };
        let created = match self.nodes.entry(id) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.get_mut().edges.push(Edge { target: prev, version: version.clone(), refs: 0 });
                false
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut node = Node::default();
                node.edges.push(Edge { target: prev, version: version.clone(), refs: 0 });
                e.insert(node);
                true
            }
        };
        if created {
            self.lock_event(event);
        }
        id
    }

    /// Locks a node and every edge compatible with `version`.
    pub fn lock_node(&mut self, id: NodeId, version: &Dewey) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.refs += 1;
            for e in n.edges.iter_mut() {
                if version.compatible_with(&e.version) {
                    e.refs += 1;
                }
            }
        }
    }

    /// Releases a node (and transitively what only it kept alive).
    pub fn release_node(&mut self, id: NodeId, version: &Dewey) {
        let mut stack: Vec<(NodeId, Dewey)> = vec![(id, version.clone())];
        while let Some((cur, v)) = stack.pop() {
            let Some(node) = self.nodes.get_mut(&cur) else {
                // Flink stops the whole release here (`break`), not just this branch.
                break;
            };
            let mut i = 0;
            while i < node.edges.len() {
                let e = &mut node.edges[i];
                if v.compatible_with(&e.version) && release(&mut e.refs) {
                    let e = node.edges.remove(i);
                    if let Some(t) = e.target {
                        stack.push((t, e.version));
                    }
                    continue;
                }
                i += 1;
            }
            if release(&mut node.refs) {
                self.nodes.remove(&cur);
                self.release_event(cur.event);
            }
        }
    }

    /// All paths from `(node, version)` back to a first event, in Flink's
    /// depth-first order (the first one is what a completed match reports).
    pub fn extract_paths(&self, id: NodeId, version: &Dewey) -> Vec<Path> {
        let mut result = Vec::new();
        if !self.nodes.contains_key(&id) {
            return result;
        }
        // (current node or end, version, path so far: newest first)
        let mut stack: Vec<(Option<NodeId>, Dewey, Vec<NodeId>)> = vec![(Some(id), version.clone(), Vec::new())];
        while let Some((cur, v, mut path)) = stack.pop() {
            match cur {
                None => {
                    let mut out: Path = Vec::new();
                    for n in path.iter().rev() {
                        match out.iter_mut().find(|(p, _)| *p == n.page) {
                            Some((_, list)) => list.push(n.event),
                            None => out.push((n.page, vec![n.event])),
                        }
                    }
                    result.push(out);
                }
                Some(nid) => {
                    let Some(node) = self.nodes.get(&nid) else { continue };
                    path.push(nid);
                    let compatible: Vec<&Edge> = node.edges.iter().filter(|e| v.compatible_with(&e.version)).collect();
                    let k = compatible.len();
                    for (i, e) in compatible.into_iter().enumerate() {
                        let p = if i + 1 == k { std::mem::take(&mut path) } else { path.clone() };
                        stack.push((e.target, e.version.clone(), p));
                    }
                }
            }
        }
        result
    }
}

/// Flink's `Lockable.release`: true when the count reaches zero (or was zero).
fn release(refs: &mut u32) -> bool {
    if *refs == 0 {
        return true;
    }
    *refs -= 1;
    *refs == 0
}
