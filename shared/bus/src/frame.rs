//! Frames: many keyed events in one bus record.
//!
//! A broker spends about as much on a record as on its bytes (tansu: a few
//! microseconds per record; librdkafka: an allocation or more per record and
//! header on both ends), so the router packs the events it sends to one
//! partition into one record, and the shard unpacks them in order. A framed
//! record carries the header [`FRAME_HEADER`]; its payload is
//! `0xCF 0x01` followed by the entries, each
//!
//! ```text
//! varint len, key · zigzag varint time · varint len, source ·
//! varint len, traceparent (0: none) · varint len, event
//! ```
//!
//! or `0xCF 0x03` followed by entries that also say where their event was read
//! ([`Origin`]; the router's frames, so that a shard can tell an event sent
//! again from a new one):
//!
//! ```text
//! … as above · varint origin partition + 1 (0: no origin) ·
//! [varint stream · varint offset · varint index within that record]
//! ```
//!
//! where `stream` indexes the frame's list of origin streams (header
//! [`ORIGIN_TOPIC_HEADER`]). Format 2 (`0xCF 0x02`, written until format 3)
//! is the same without the stream (every origin in the list's first one);
//! it is still read.
//!
//! A frame's first entry decides its format: entries with an origin make a
//! frame of format 3, entries without one a frame of format 1 (ingest's, which
//! routers of every version read).
//!
//! Record-level headers (the router's watermark) apply after the last entry.

/// Header that marks a framed record (its value is [`FRAME_VERSION`]).
pub const FRAME_HEADER: &str = "cepheid-frame";
/// The value of [`FRAME_HEADER`]: `1` for frames of every format (the
/// payload's first two bytes tell which; a reader older than a format takes
/// its payload for unreadable).
pub const FRAME_VERSION: &[u8] = b"1";
/// Header of an ingest frame: per source, the newest event time of the post
/// it came from, up to its last entry (a JSON object, e.g.
/// `{"clickstream":1700000000000}`). Ingest writes a post to several
/// partitions at once; its newest event need not be in every one. Under the
/// source's bounded out-of-orderness (what the engine's watermark assumes of
/// a source as a whole), what ingest accepts after the post is at most the
/// bound behind this time, so the router counts it as this partition's
/// newest time too. It applies after the frame's entries.
pub const FRONTIER_HEADER: &str = "cepheid-frontier";

/// Header of a router's frame: the streams its entries' origins are in,
/// separated by commas (Kafka topic names hold no comma); an [`Origin`]'s
/// `stream` is an index into this list. A stream is the events topic the
/// router read (an event posted to ingest: its origin is the events record),
/// or `RAW via EVENTS/P` for an event ingest forwarded from raw topic `RAW`
/// to partition `P` of events topic `EVENTS` (its origin is the raw record:
/// ingest forwarding a raw record again, after a restart, writes it at a new
/// events offset, but its raw position is the same). Within one stream and
/// origin partition, the events of one router come in the order of their
/// origins. Two routers reading different events topics may feed one keyed
/// topic, so the names are kept whole.
pub const ORIGIN_TOPIC_HEADER: &str = "cepheid-origin-topic";

/// Header of a record ingest forwarded from a raw topic: where it was read,
/// `TOPIC/PARTITION/OFFSET` (also on the dead letters of raw records).
pub const RAW_ORIGIN_HEADER: &str = "cepheid-origin";

/// The stream name of the events ingest forwarded from raw topic `raw` to
/// partition `partition` of events topic `events` (see [`ORIGIN_TOPIC_HEADER`]).
pub fn raw_stream(raw: &str, events: &str, partition: i32) -> String {
    format!("{raw} via {events}/{partition}")
}

/// Reads a [`RAW_ORIGIN_HEADER`] value: (topic, partition, offset).
pub fn parse_raw_origin(v: &[u8]) -> Option<(&str, i32, i64)> {
    let v = std::str::from_utf8(v).ok()?;
    let (rest, offset) = v.rsplit_once('/')?;
    let (topic, partition) = rest.rsplit_once('/')?;
    (!topic.is_empty()).then_some(())?;
    Some((topic, partition.parse().ok()?, offset.parse().ok()?))
}

const MAGIC: [u8; 2] = [0xCF, 0x01];
const MAGIC_ORIGINS: [u8; 2] = [0xCF, 0x02];
const MAGIC_STREAMS: [u8; 2] = [0xCF, 0x03];

/// Where an event was read: its stream (an index into the frame's
/// [`ORIGIN_TOPIC_HEADER`] list), the partition and offset of its record
/// there, and the event's index within that record (an ingest frame holds
/// many events). Within one stream and partition, origins in the order read
/// are ascending in (`offset`, `index`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub stream: u32,
    pub partition: i32,
    pub offset: i64,
    pub index: u32,
}

impl Origin {
    /// Its place within its stream's partition: later events have greater ones.
    pub fn position(&self) -> (i64, u32) {
        (self.offset, self.index)
    }
}

/// One event of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// `signature|key`, as a single keyed record's key.
    pub key: &'a [u8],
    /// Event time (ms).
    pub time: i64,
    pub source: &'a str,
    pub trace: Option<&'a str>,
    /// The event as received.
    pub payload: &'a [u8],
    /// Where the router read it (frames of formats 2 and 3 only).
    pub origin: Option<Origin>,
}

/// A frame being filled.
#[derive(Debug, Default)]
pub struct FrameWriter {
    buf: Vec<u8>,
    count: usize,
    /// The frame is of format 3 (its entries carry origins).
    origins: bool,
}

impl FrameWriter {
    /// Adds an entry. The first entry decides the frame's format (see the
    /// module's doc): an entry with an origin in a frame begun without one
    /// loses it, so a writer's entries should all have one or none.
    pub fn push(&mut self, e: &Entry<'_>) {
        if self.buf.is_empty() {
            self.origins = e.origin.is_some();
            self.buf.extend_from_slice(if self.origins { &MAGIC_STREAMS } else { &MAGIC });
        }
        debug_assert!(self.origins || e.origin.is_none(), "an entry with an origin in a frame of format 1");
        bytes(&mut self.buf, e.key);
        varint(&mut self.buf, ((e.time << 1) ^ (e.time >> 63)) as u64);
        bytes(&mut self.buf, e.source.as_bytes());
        bytes(&mut self.buf, e.trace.unwrap_or_default().as_bytes());
        bytes(&mut self.buf, e.payload);
        if self.origins {
            match e.origin {
                Some(o) => {
                    varint(&mut self.buf, u64::from(o.partition as u32) + 1);
                    varint(&mut self.buf, u64::from(o.stream));
                    varint(&mut self.buf, o.offset as u64);
                    varint(&mut self.buf, u64::from(o.index));
                }
                None => varint(&mut self.buf, 0),
            }
        }
        self.count += 1;
    }

    /// Entries in the frame.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size of the payload so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The payload; the writer is empty again (with room for a frame as big).
    pub fn take(&mut self) -> Vec<u8> {
        self.count = 0;
        let room = self.buf.len();
        std::mem::replace(&mut self.buf, Vec::with_capacity(room))
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Why a frame cannot be read (from the entry on: the ones before it were good).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a frame of format 1, 2 or 3 (it starts with {0:02x?})")]
    Format(Vec<u8>),
    #[error("entry {entry}: cut short at byte {at}")]
    Truncated { entry: usize, at: usize },
    #[error("entry {entry}: its source is not UTF-8")]
    Source { entry: usize },
    #[error("entry {entry}: its traceparent is not UTF-8")]
    Trace { entry: usize },
    #[error("entry {entry}: its origin is out of range")]
    Origin { entry: usize },
}

/// The entries of a frame's payload, in order.
pub fn entries(payload: &[u8]) -> Entries<'_> {
    let streams = payload.starts_with(&MAGIC_STREAMS);
    let origins = streams || payload.starts_with(&MAGIC_ORIGINS);
    let known = origins || payload.starts_with(&MAGIC);
    Entries { buf: payload, at: if known { 2 } else { 0 }, start: 0, entry: 0, failed: !known, first: true, origins, streams }
}

/// Iterator over a frame's entries; after an error it ends.
pub struct Entries<'a> {
    buf: &'a [u8],
    at: usize,
    /// Where the entry read last began.
    start: usize,
    entry: usize,
    failed: bool,
    first: bool,
    /// Formats 2 and 3: every entry ends with its origin.
    origins: bool,
    /// Format 3: an origin names its stream.
    streams: bool,
}

impl<'a> Entries<'a> {
    /// The payload from the entry read last on (after an error: the damaged
    /// rest, which is what a dead letter should carry, not the good entries
    /// before it).
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.start.min(self.buf.len())..]
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.at)?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        let end = self.at.checked_add(n).filter(|e| *e <= self.buf.len())?;
        let b = &self.buf[self.at..end];
        self.at = end;
        Some(b)
    }

    fn entry(&mut self) -> Result<Entry<'a>, FrameError> {
        let entry = self.entry;
        let cut = |at| FrameError::Truncated { entry, at };
        let key = self.bytes().ok_or_else(|| cut(self.at))?;
        let z = self.varint().ok_or_else(|| cut(self.at))?;
        let time = ((z >> 1) as i64) ^ -((z & 1) as i64);
        let source = std::str::from_utf8(self.bytes().ok_or_else(|| cut(self.at))?).map_err(|_| FrameError::Source { entry })?;
        let trace = std::str::from_utf8(self.bytes().ok_or_else(|| cut(self.at))?).map_err(|_| FrameError::Trace { entry })?;
        let payload = self.bytes().ok_or_else(|| cut(self.at))?;
        let origin = if self.origins {
            match self.varint().ok_or_else(|| cut(self.at))? {
                0 => None,
                p => {
                    let stream = if self.streams { self.varint().ok_or_else(|| cut(self.at))? } else { 0 };
                    let offset = self.varint().ok_or_else(|| cut(self.at))?;
                    let index = self.varint().ok_or_else(|| cut(self.at))?;
                    let out_of_range = || FrameError::Origin { entry };
                    Some(Origin {
                        stream: u32::try_from(stream).map_err(|_| out_of_range())?,
                        partition: i32::try_from(p - 1).map_err(|_| out_of_range())?,
                        offset: i64::try_from(offset).map_err(|_| out_of_range())?,
                        index: u32::try_from(index).map_err(|_| out_of_range())?,
                    })
                }
            }
        } else {
            None
        };
        Ok(Entry { key, time, source, trace: (!trace.is_empty()).then_some(trace), payload, origin })
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            if std::mem::take(&mut self.first) {
                return Some(Err(FrameError::Format(self.buf.iter().take(2).copied().collect())));
            }
            return None;
        }
        if self.at >= self.buf.len() {
            return None;
        }
        self.start = self.at;
        let r = self.entry();
        self.entry += 1;
        if r.is_err() {
            self.failed = true;
            self.first = false;
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_in_order() {
        let mut w = FrameWriter::default();
        let es = [
            Entry { key: b"userId|7", time: 1_700_000_000_123, source: "clickstream", trace: None, payload: br#"{"a":1}"#, origin: None },
            Entry { key: b"userId,productId|7|3", time: -5, source: "orders", trace: Some("00-abc-def-01"), payload: b"", origin: None },
            Entry { key: b"", time: i64::MIN, source: "", trace: None, payload: &[0xff; 300], origin: None },
        ];
        for e in &es {
            w.push(e);
        }
        assert_eq!(w.len(), 3);
        let buf = w.take();
        assert!(w.is_empty() && w.bytes() == 0);
        let back: Vec<Entry> = entries(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(back, es);
        assert_eq!(entries(&[]).count(), 1, "an empty payload is not a frame");
    }

    #[test]
    fn origins_come_back_with_their_entries() {
        let at = |stream, partition, offset, index| Some(Origin { stream, partition, offset, index });
        let es = [
            Entry { key: b"userId|7", time: 5, source: "clickstream", trace: None, payload: b"{}", origin: at(0, 0, 0, 0) },
            Entry { key: b"userId|8", time: 6, source: "clickstream", trace: Some("00-abc-def-01"), payload: b"{}", origin: at(2, 3, 1 << 40, 399) },
            Entry { key: b"userId|9", time: 7, source: "clickstream", trace: None, payload: b"{}", origin: None },
            Entry { key: b"userId|9", time: 7, source: "clickstream", trace: None, payload: b"{}", origin: at(u32::MAX, i32::MAX, i64::MAX, u32::MAX) },
        ];
        let mut w = FrameWriter::default();
        for e in &es {
            w.push(e);
        }
        let buf = w.take();
        assert_eq!(buf[..2], [0xCF, 0x03], "a frame whose first entry has an origin is of format 3");
        let back: Vec<Entry> = entries(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(back, es);
        // Without origins the writer still writes format 1, which routers of every version read.
        w.push(&Entry { origin: None, ..es[0] });
        assert_eq!(w.take()[..2], [0xCF, 0x01]);
        // An origin past what its fields hold is an error at its entry, not a wrapped number.
        let mut w = FrameWriter::default();
        w.push(&Entry { origin: at(0, 0, 1, 0), ..es[0] });
        let mut f = w.take();
        f.truncate(f.len() - 4);
        f.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x10, 0x00, 0x00, 0x00]); // partition + 1 = 2^32, stream 0, offset 0, index 0
        assert!(matches!(entries(&f).next(), Some(Err(FrameError::Origin { entry: 0 }))), "{:?}", entries(&f).next());
    }

    /// Format 2 (the eighth and ninth sessions' routers): origins without a
    /// stream, all in the first stream of the list.
    #[test]
    fn format_2_origins_are_in_the_first_stream() {
        let mut f = vec![0xCF, 0x02];
        for (key, offset, index) in [(&b"userId|7"[..], 5u8, 0u8), (b"userId|8", 6, 2)] {
            f.push(key.len() as u8);
            f.extend_from_slice(key);
            f.push(10); // time 5, zigzag
            f.push(1);
            f.push(b's');
            f.push(0); // no traceparent
            f.push(2);
            f.extend_from_slice(b"{}");
            f.extend_from_slice(&[3 + 1, offset, index]); // partition 3
        }
        f.push(b"k".len() as u8);
        f.extend_from_slice(b"k\x0a\x01s\x00\x00\x00"); // time 5, no payload, no origin
        let back: Vec<Entry> = entries(&f).collect::<Result<_, _>>().unwrap();
        let origins: Vec<Option<Origin>> = back.iter().map(|e| e.origin).collect();
        assert_eq!(
            origins,
            [Some(Origin { stream: 0, partition: 3, offset: 5, index: 0 }), Some(Origin { stream: 0, partition: 3, offset: 6, index: 2 }), None]
        );
        assert_eq!(back[1].key, b"userId|8");
        assert_eq!(back[2].payload, b"");
    }

    #[test]
    fn raw_origins_read_back() {
        assert_eq!(parse_raw_origin(b"click_stream1/3/42"), Some(("click_stream1", 3, 42)));
        assert_eq!(parse_raw_origin(b"a.b-c/0/0"), Some(("a.b-c", 0, 0)));
        for bad in [&b"click_stream1/3"[..], b"/3/4", b"t/x/4", b"t/3/", b"", b"t/3/4/"] {
            assert_eq!(parse_raw_origin(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(raw_stream("click_stream1", "cepheid.events", 2), "click_stream1 via cepheid.events/2");
    }

    #[test]
    fn damage_is_reported_at_the_entry() {
        let mut w = FrameWriter::default();
        w.push(&Entry { key: b"k1", time: 1, source: "s", trace: None, payload: b"one", origin: None });
        w.push(&Entry { key: b"k2", time: 2, source: "s", trace: None, payload: b"two", origin: None });
        let buf = w.take();
        let cut: Vec<_> = entries(&buf[..buf.len() - 1]).collect();
        assert_eq!(cut.len(), 2);
        assert!(cut[0].is_ok());
        assert!(matches!(cut[1], Err(FrameError::Truncated { entry: 1, .. })), "{cut:?}");
        let mut it = entries(&buf[..buf.len() - 1]);
        assert!(it.next().unwrap().is_ok());
        assert!(it.next().unwrap().is_err());
        assert_eq!(it.rest(), &buf[2 + 1 + 2 + 1 + 1 + 1 + 1 + 1 + 3..buf.len() - 1], "the damaged entry on, not the good one before it");
        let wrong: Vec<_> = entries(b"{\"json\":1}").collect();
        assert!(matches!(&wrong[..], [Err(FrameError::Format(_))]), "{wrong:?}");
    }
}
