//! The binary form of a key cell's snapshot: what matcher shards store in
//! Redis at every checkpoint and passivation.
//!
//! A cell's JSON document ([`CellSnapshot`] through serde) spends most of its
//! bytes on field names, number text and escaped event text, and a
//! checkpoint writes every key that changed, so shards store this compact
//! form instead: varints, no field names, and each event's text once per
//! cell (the rules of a key usually hold the same events). It is written
//! straight from the live cell ([`crate::cell::KeyCell::encode`]) and read back into the same
//! [`CellSnapshot`] the JSON form gives ([`decode`]), so restoring does not
//! depend on which form was stored; [`decode`] also accepts the JSON form
//! (checkpoints written before this format).
//!
//! Layout (format 3; `v` = unsigned LEB128 varint, `z` = zigzag varint,
//! `s` = `v` length then UTF-8 bytes, `o` = a byte 0/1 then the value,
//! `f` = an f64's 8 bytes, little-endian):
//!
//! ```text
//! cell     = 0xCE 0x50 format:u8 key:s(JSON array) v(rules) rule*
//! rule     = id:s version:v automaton:s next_seq:v v(n) cs* v(n) cs* v(n) event* v(n) node*
//! cs       = state:v o(node_id) dewey start_ts:z prev_ts:z o(event_id) o(aggs) o(deadline:z)
//! aggs     = v(n) agg*
//! agg      = 0 count:v | 1 int:z float:f is_float:u8 n:v | 2 o(value) | 3 o(value)
//!          | 4 keep:v v(n) value*          -- count, sum, min/max, first, last
//! value    = 0 | 1 | 2 | 3 z | 4 f | 5 s   -- null, false, true, int, float, string
//! event    = event_id refs:v time:z text
//! text     = v(0) s              -- new text, numbered in order of appearance from 1
//!          | v(n)                -- the n-th text of this cell again
//! node     = node_id refs:v v(n) (o(node_id) dewey refs:v)*
//! event_id = t:z seq:v           node_id = event_id page:v        dewey = v(n) v*
//! ```
//!
//! Format 2 differs only in `aggs`: the aggregate states as JSON text (`s`),
//! which cost a checkpoint more than any other part of a cell to write; it
//! still reads.

use rustc_hash::FxHashMap;

use cepheid_rules::{AggState, SerValue};

use crate::cell::{CellRuleSnapshot, CellSnapshot};
use crate::nfa::buffer::{EventId, NodeId};
use crate::nfa::run::Cs;
use crate::snapshot::{CsSnap, EdgeSnap, EventSnap, KeySnapshot, NodeSnap, SnapshotError, FORMAT};

const MAGIC: [u8; 2] = [0xCE, 0x50];
/// The binary cell format written (the JSON form is format 1; format 2, with
/// aggregate states as JSON text, still reads).
pub const CELL_FORMAT: u8 = 3;
/// The oldest binary format that reads.
const OLDEST_BINARY: u8 = 2;

/// What [`encode_as`] needs of one running rule.
pub(crate) struct RuleView<'a> {
    pub id: &'a str,
    pub version: u64,
    pub automaton: &'a str,
    pub state: &'a crate::nfa::NfaState,
}

struct Writer<'a> {
    out: Vec<u8>,
    /// The format written ([`CELL_FORMAT`]; 2 only in tests of reading it).
    format: u8,
    /// Texts written so far, by address: the rules of a key share their
    /// events (one allocation each), so hashing the address finds a repeat
    /// without hashing its text. (A text held twice in separate allocations
    /// is written twice; it reads back the same.)
    texts: FxHashMap<usize, u64>,
    /// The texts are borrowed for the writer's whole life, so no address is
    /// freed and reused for another text while it runs.
    _texts: std::marker::PhantomData<&'a str>,
}

impl<'a> Writer<'a> {
    fn v(&mut self, mut x: u64) {
        while x >= 0x80 {
            self.out.push((x as u8) | 0x80);
            x >>= 7;
        }
        self.out.push(x as u8);
    }
    fn z(&mut self, x: i64) {
        self.v(((x << 1) ^ (x >> 63)) as u64);
    }
    fn s(&mut self, s: &str) {
        self.v(s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }
    fn flag(&mut self, b: bool) {
        self.out.push(b as u8);
    }
    fn event_id(&mut self, e: &EventId) {
        self.z(e.t);
        self.v(e.seq);
    }
    fn node_id(&mut self, n: &NodeId) {
        self.event_id(&n.event);
        self.v(n.page as u64);
    }
    fn opt_node(&mut self, n: &Option<NodeId>) {
        self.flag(n.is_some());
        if let Some(n) = n {
            self.node_id(n);
        }
    }
    fn dewey(&mut self, d: &[u32]) {
        self.v(d.len() as u64);
        for x in d {
            self.v(*x as u64);
        }
    }
    fn text(&mut self, t: &'a str) {
        match self.texts.get(&(t.as_ptr() as usize)) {
            Some(n) => self.v(*n),
            None => {
                let n = self.texts.len() as u64 + 1;
                self.texts.insert(t.as_ptr() as usize, n);
                self.v(0);
                self.s(t);
            }
        }
    }
    fn f(&mut self, x: f64) {
        self.out.extend_from_slice(&x.to_bits().to_le_bytes());
    }
    fn value(&mut self, x: &SerValue) {
        match x {
            SerValue::Null => self.out.push(0),
            SerValue::Bool(false) => self.out.push(1),
            SerValue::Bool(true) => self.out.push(2),
            SerValue::Int(i) => {
                self.out.push(3);
                self.z(*i);
            }
            SerValue::Float(f) => {
                self.out.push(4);
                self.f(*f);
            }
            SerValue::Str(t) => {
                self.out.push(5);
                self.s(t);
            }
        }
    }
    fn opt_value(&mut self, x: &Option<SerValue>) {
        self.flag(x.is_some());
        if let Some(x) = x {
            self.value(x);
        }
    }
    fn agg(&mut self, a: &AggState) {
        match a {
            AggState::Count(c) => {
                self.out.push(0);
                self.v(*c);
            }
            AggState::Sum { int, float, is_float, n } => {
                self.out.push(1);
                self.z(*int);
                self.f(*float);
                self.flag(*is_float);
                self.v(*n);
            }
            AggState::MinMax(x) => {
                self.out.push(2);
                self.opt_value(x);
            }
            AggState::First(x) => {
                self.out.push(3);
                self.opt_value(x);
            }
            AggState::Last { keep, values } => {
                self.out.push(4);
                self.v(u64::from(*keep));
                self.v(values.len() as u64);
                for x in values {
                    self.value(x);
                }
            }
        }
    }
    fn cs(&mut self, c: &Cs) {
        self.v(c.state as u64);
        self.opt_node(&c.node);
        self.dewey(&c.version.0);
        self.z(c.start_ts);
        self.z(c.prev_ts);
        self.flag(c.start_id.is_some());
        if let Some(e) = &c.start_id {
            self.event_id(e);
        }
        self.flag(c.aggs.is_some());
        if let Some(a) = &c.aggs {
            if self.format == 2 {
                self.s(&serde_json::to_string(a.as_ref()).expect("aggregate state serialises"));
            } else {
                self.v(a.len() as u64);
                for x in a.iter() {
                    self.agg(x);
                }
            }
        }
        self.flag(c.deadline.is_some());
        if let Some(d) = c.deadline {
            self.z(d);
        }
    }
}

/// Encodes a cell in binary format `format` ([`CELL_FORMAT`]; 2 only to test
/// that it still reads): its key (the JSON text of the array
/// [`CellSnapshot::key`] holds) and its running rules.
pub(crate) fn encode_as(format: u8, key: &str, rules: &[RuleView<'_>]) -> Vec<u8> {
    assert!((OLDEST_BINARY..=CELL_FORMAT).contains(&format), "binary cell format {format} is not written");
    // As many texts as the rule holding the most events, about (the rules of a key share most of theirs).
    let held = rules.iter().map(|r| r.state.buffer.events.len()).max().unwrap_or(0);
    let mut texts = FxHashMap::default();
    texts.reserve(held);
    let mut w = Writer { out: Vec::with_capacity(1024), format, texts, _texts: std::marker::PhantomData };
    w.out.extend_from_slice(&MAGIC);
    w.out.push(format);
    w.s(key);
    w.v(rules.len() as u64);
    // Sorting lists, one allocation each for all the cell's rules.
    let (mut events, mut nodes) = (Vec::new(), Vec::new());
    for r in rules {
        let st = r.state;
        w.s(r.id);
        w.v(r.version);
        w.s(r.automaton);
        w.v(st.next_seq);
        for pq in [st.partial.as_slice(), st.completed.as_slice()] {
            w.v(pq.len() as u64);
            for c in pq {
                w.cs(c);
            }
        }
        // Sorted as the JSON form is, so that equal states encode equally.
        events.clear();
        events.extend(st.buffer.events.iter());
        events.sort_unstable_by_key(|(id, _)| **id);
        w.v(events.len() as u64);
        for &(id, (ev, refs)) in &events {
            w.event_id(id);
            w.v(*refs as u64);
            w.z(ev.time());
            w.text(ev.raw());
        }
        nodes.clear();
        nodes.extend(st.buffer.nodes.iter());
        nodes.sort_unstable_by_key(|(id, _)| (id.event, id.page));
        w.v(nodes.len() as u64);
        for &(id, n) in &nodes {
            w.node_id(id);
            w.v(n.refs as u64);
            w.v(n.edges.len() as u64);
            for e in &n.edges {
                w.opt_node(&e.target);
                w.dewey(&e.version.0);
                w.v(e.refs as u64);
            }
        }
    }
    w.out
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    format: u8,
    texts: Vec<String>,
}

fn bad(at: usize, what: &str) -> SnapshotError {
    SnapshotError::Inconsistent(format!("binary cell snapshot, byte {at}: {what}"))
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, SnapshotError> {
        let b = *self.buf.get(self.at).ok_or_else(|| bad(self.at, "ends early"))?;
        self.at += 1;
        Ok(b)
    }
    fn v(&mut self) -> Result<u64, SnapshotError> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            x |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err(bad(self.at, "varint too long"))
    }
    fn v32(&mut self) -> Result<u32, SnapshotError> {
        let at = self.at;
        u32::try_from(self.v()?).map_err(|_| bad(at, "number out of range"))
    }
    fn z(&mut self) -> Result<i64, SnapshotError> {
        let u = self.v()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }
    /// A count of items that each take at least one byte (bounds allocations on corrupt input).
    fn count(&mut self) -> Result<usize, SnapshotError> {
        let at = self.at;
        let n = self.v()? as usize;
        if n > self.buf.len() - self.at {
            return Err(bad(at, "count larger than the snapshot"));
        }
        Ok(n)
    }
    /// A count, then that many items.
    fn seq<T>(&mut self, mut item: impl FnMut(&mut Self) -> Result<T, SnapshotError>) -> Result<Vec<T>, SnapshotError> {
        let n = self.count()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(item(self)?);
        }
        Ok(v)
    }
    fn s(&mut self) -> Result<String, SnapshotError> {
        let at = self.at;
        let n = self.count()?;
        let bytes = &self.buf[self.at..self.at + n];
        self.at += n;
        String::from_utf8(bytes.to_vec()).map_err(|_| bad(at, "text is not UTF-8"))
    }
    fn flag(&mut self) -> Result<bool, SnapshotError> {
        let at = self.at;
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(bad(at, "expected 0 or 1")),
        }
    }
    fn event_id(&mut self) -> Result<EventId, SnapshotError> {
        Ok(EventId { t: self.z()?, seq: self.v()? })
    }
    fn node_id(&mut self) -> Result<NodeId, SnapshotError> {
        let event = self.event_id()?;
        let at = self.at;
        let page = u16::try_from(self.v()?).map_err(|_| bad(at, "stage out of range"))?;
        Ok(NodeId { event, page })
    }
    fn opt_node(&mut self) -> Result<Option<NodeId>, SnapshotError> {
        Ok(if self.flag()? { Some(self.node_id()?) } else { None })
    }
    fn dewey(&mut self) -> Result<Vec<u32>, SnapshotError> {
        self.seq(Self::v32)
    }
    fn text(&mut self) -> Result<String, SnapshotError> {
        let at = self.at;
        match self.v()? as usize {
            0 => {
                let t = self.s()?;
                self.texts.push(t.clone());
                Ok(t)
            }
            n => self.texts.get(n - 1).cloned().ok_or_else(|| bad(at, "refers to an event text not seen yet")),
        }
    }
    fn f(&mut self) -> Result<f64, SnapshotError> {
        let bytes = self.buf.get(self.at..self.at + 8).ok_or_else(|| bad(self.at, "ends early"))?;
        self.at += 8;
        Ok(f64::from_bits(u64::from_le_bytes(bytes.try_into().expect("8 bytes"))))
    }
    fn value(&mut self) -> Result<SerValue, SnapshotError> {
        let at = self.at;
        Ok(match self.byte()? {
            0 => SerValue::Null,
            1 => SerValue::Bool(false),
            2 => SerValue::Bool(true),
            3 => SerValue::Int(self.z()?),
            4 => SerValue::Float(self.f()?),
            5 => SerValue::Str(self.s()?),
            t => return Err(bad(at, &format!("unknown value tag {t}"))),
        })
    }
    fn opt_value(&mut self) -> Result<Option<SerValue>, SnapshotError> {
        Ok(if self.flag()? { Some(self.value()?) } else { None })
    }
    fn agg(&mut self) -> Result<AggState, SnapshotError> {
        let at = self.at;
        Ok(match self.byte()? {
            0 => AggState::Count(self.v()?),
            1 => AggState::Sum { int: self.z()?, float: self.f()?, is_float: self.flag()?, n: self.v()? },
            2 => AggState::MinMax(self.opt_value()?),
            3 => AggState::First(self.opt_value()?),
            4 => {
                let keep = self.v32()?;
                AggState::Last { keep, values: self.seq(Self::value)?.into() }
            }
            t => return Err(bad(at, &format!("unknown aggregate tag {t}"))),
        })
    }
    fn cs(&mut self) -> Result<CsSnap, SnapshotError> {
        let state = self.v32()?;
        let node = self.opt_node()?;
        let version = self.dewey()?;
        let start_ts = self.z()?;
        let prev_ts = self.z()?;
        let start_id = if self.flag()? { Some(self.event_id()?) } else { None };
        let aggs = if !self.flag()? {
            None
        } else if self.format == 2 {
            let at = self.at;
            let text = self.s()?;
            Some(serde_json::from_str(&text).map_err(|e| bad(at, &format!("aggregate state: {e}")))?)
        } else {
            Some(self.seq(Self::agg)?)
        };
        let deadline = if self.flag()? { Some(self.z()?) } else { None };
        Ok(CsSnap { state, node, version, start_ts, prev_ts, start_id, aggs, deadline })
    }
}

/// Reads a stored cell: the binary form, or the JSON form of earlier checkpoints.
pub fn decode(buf: &[u8]) -> Result<CellSnapshot, SnapshotError> {
    if buf.first() == Some(&b'{') {
        return serde_json::from_slice(buf).map_err(|e| SnapshotError::Inconsistent(format!("JSON cell snapshot: {e}")));
    }
    if buf.len() < 3 || buf[..2] != MAGIC {
        return Err(bad(0, "not a cell snapshot (neither the binary form nor JSON)"));
    }
    if buf[2] > CELL_FORMAT {
        return Err(SnapshotError::NewerFormat(buf[2] as u32));
    }
    if buf[2] < OLDEST_BINARY {
        return Err(bad(2, &format!("unknown binary format {}", buf[2])));
    }
    let mut r = Reader { buf, at: 3, format: buf[2], texts: Vec::new() };
    let at = r.at;
    let key: Vec<serde_json::Value> = serde_json::from_str(&r.s()?).map_err(|e| bad(at, &format!("key: {e}")))?;
    let rules = r.seq(|r| {
        let id = r.s()?;
        let version = r.v()?;
        let automaton = r.s()?;
        let next_seq = r.v()?;
        let partial = r.seq(Reader::cs)?;
        let completed = r.seq(Reader::cs)?;
        let events = r.seq(|r| Ok(EventSnap { id: r.event_id()?, refs: r.v32()?, time: r.z()?, raw: r.text()? }))?;
        let nodes = r.seq(|r| {
            let id = r.node_id()?;
            let refs = r.v32()?;
            let edges = r.seq(|r| Ok(EdgeSnap { target: r.opt_node()?, version: r.dewey()?, refs: r.v32()? }))?;
            Ok(NodeSnap { id, refs, edges })
        })?;
        Ok(CellRuleSnapshot { id, version, state: KeySnapshot { format: FORMAT, automaton, next_seq, partial, completed, events, nodes } })
    })?;
    if r.at != buf.len() {
        return Err(bad(r.at, "trailing bytes"));
    }
    Ok(CellSnapshot { key, rules })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_with_its_position() {
        assert!(decode(b"").is_err());
        assert!(decode(b"hello").unwrap_err().to_string().contains("neither the binary form nor JSON"));
        let e = decode(&[0xCE, 0x50, CELL_FORMAT, 5, b'[']).unwrap_err().to_string();
        assert!(e.contains("byte 3"), "{e}");
        assert!(matches!(decode(&[0xCE, 0x50, 9]), Err(SnapshotError::NewerFormat(9))));
        assert!(decode(&[0xCE, 0x50, 1, 2, b'[', b']', 0]).unwrap_err().to_string().contains("unknown binary format 1"));
    }

    #[test]
    fn varints_round_trip() {
        for x in [0i64, 1, -1, 63, -64, 64, i64::MAX, i64::MIN, 1_795_364_993_084] {
            let mut w = Writer { out: Vec::new(), format: CELL_FORMAT, texts: FxHashMap::default(), _texts: std::marker::PhantomData };
            w.z(x);
            w.v(x as u64);
            let mut r = Reader { buf: &w.out, at: 0, format: CELL_FORMAT, texts: Vec::new() };
            assert_eq!(r.z().unwrap(), x);
            assert_eq!(r.v().unwrap(), x as u64);
            assert_eq!(r.at, w.out.len());
        }
    }
}
