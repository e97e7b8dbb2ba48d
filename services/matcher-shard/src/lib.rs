//! The matcher shard: a member of the consumer group on the keyed topic.
//!
//! Per assigned partition it keeps a reorder buffer released by the
//! partition's watermark (per source, the minimum over the routers that sent
//! one), and one `ractor` actor per key holding that key's automata for the
//! rules of the event's key signature ([`cepheid_engine::cell::KeyCell`]).
//! Events arrive in frames (many per record, [`cepheid_bus::frame`]) or one
//! per record; a frame's watermarks apply after its events.
//! When the watermark advances, the released events are handed to their
//! keys' actors in `(time, arrival)` order together with the watermark, so
//! every key sees exactly what it sees in `cepheid run`; deadlines due at the
//! watermark fire from a per-partition timer index, also for keys whose
//! actor was passivated.
//!
//! Every `checkpoint_interval_ms` or `checkpoint_records` records the dirty
//! key states, the timer index changes and the partition's offsets are
//! written to Redis, committed by one `MULTI`/`EXEC` and fenced by the
//! partition's ownership epoch ([`checkpoint`]); the events still waiting in
//! the reorder buffer are not copied but read again from the topic at
//! restore ([`checkpoint::Meta`]). The partition's loop notes
//! the dirty keys and reads on; a task asks their actors for snapshots a few
//! at a time (a key about to step is asked first, so every snapshot is as of
//! the checkpoint), and a writer task collects them and stores the checkpoint. Once stored, the offset is committed
//! to the group and keys idle for `passivate_after_ms` are passivated (their
//! state is in Redis; the actor stops). A shard that takes a partition — at
//! start, after a crash of another, in a rebalance — restores from the
//! checkpoint and reads on from its offset; matches the replay produces
//! again have the same `match_id`, and the notifier drops them.
//!
//! Matches go to the matches topic keyed by `match_id`. Rules come from the
//! Redis rule store: a full resync at start and whenever the change feed
//! ends, live changes in between (a replaced rule's keys start afresh; the
//! other rules keep their partial matches).

pub mod actor;
pub mod checkpoint;

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cepheid_bus::frame::{self, FRAME_HEADER};
use cepheid_bus::{Bus, Consumer, Message};
use cepheid_engine::cell::{KeyCell, Released, RuleBook, SigRules};
use cepheid_engine::engine::{EngineConfig, TimeOrdered};
use cepheid_state::rules::{RedisRuleStore, RuleUpdate};
use cepheid_telemetry::{Kind, Telemetry, Traced, TRACEPARENT};
use cepheid_types::Clock;
use ractor::{Actor, ActorRef};
use rustc_hash::FxHashMap;
use serde::Deserialize;
use tokio::time::Instant;

use actor::{KeyActor, KeyMsg, Outbox, StepReply};
use checkpoint::{Checkpoints, Done, Job, Meta, PendingRecord, RouterMark};

/// The `[shard]` configuration section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    #[serde(default = "keyed_topic")]
    pub keyed_topic: String,
    #[serde(default = "partitions")]
    pub keyed_partitions: i32,
    #[serde(default = "matches_topic")]
    pub matches_topic: String,
    #[serde(default = "partitions")]
    pub matches_partitions: i32,
    #[serde(default = "dead_letter_topic")]
    pub dead_letter_topic: String,
    #[serde(default = "group")]
    pub group: String,
    /// Checkpoint a partition at least this often (ms) while it has changes…
    #[serde(default = "ckpt_ms")]
    pub checkpoint_interval_ms: u64,
    /// …or after this many records.
    #[serde(default = "ckpt_records")]
    pub checkpoint_records: u64,
    /// A key's actor is stopped (its state stays in Redis) after this long without work.
    #[serde(default = "passivate_ms")]
    pub passivate_after_ms: u64,
    /// At most this many key actors running in the shard (0: no bound): at
    /// each checkpoint, past this many the least recently used keys whose
    /// state it stored (and that did not change since) are passivated too,
    /// however recently used — a burst of keys that then go quiet leaves
    /// memory at once (a key holds ~17 KB running, BENCHMARKS.md, "Memory").
    /// Not a hard limit: keys changing faster than checkpoints complete are
    /// never stored-and-unchanged, and stay running.
    #[serde(default)]
    pub max_running_keys: u64,
    /// A Redis command of the checkpoints (staging, commit, loading a key)
    /// not answered within this long (ms) fails and is retried: a Redis on
    /// busy cores can take seconds, and a checkpoint that times out is
    /// written again whole.
    #[serde(default = "redis_timeout")]
    pub redis_timeout_ms: u64,
    /// A router not heard from for this long no longer holds the watermark back.
    #[serde(default = "router_expiry")]
    pub router_expiry_ms: u64,
    /// While records keep coming, events are released to their keys at most
    /// this often (ms) as the watermark carried by frames of events moves: the
    /// keys' work and the match records of this long go together. When no
    /// record is waiting (and on a watermark record) they are released at once.
    #[serde(default = "release_ms")]
    pub release_interval_ms: u64,
    /// A checkpoint asks its keys' actors for their snapshots this many at a
    /// time, letting the partition loop run in between (larger: the
    /// checkpoint is written sooner; smaller: matches wait less behind it).
    #[serde(default = "snapshot_batch")]
    pub snapshot_batch: usize,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[serde(default = "listen")]
    pub listen: String,
    /// Threads of the shard process's runtime (the binary's; `run` uses the
    /// runtime it is called on): 1 runs the partition loop and every key's
    /// actor on one thread, 0 one per core, n that many.
    #[serde(default = "threads")]
    pub threads: usize,
}

fn keyed_topic() -> String {
    "cepheid.keyed".into()
}
fn matches_topic() -> String {
    "cepheid.matches".into()
}
fn dead_letter_topic() -> String {
    "cepheid.dead-letter".into()
}
fn partitions() -> i32 {
    8
}
fn group() -> String {
    "cepheid-shard".into()
}
fn ckpt_ms() -> u64 {
    5_000
}
fn ckpt_records() -> u64 {
    100_000
}
fn passivate_ms() -> u64 {
    60_000
}
/// Passivated keys read from Redis per round trip when a release brings them back.
const RESTORE_CHUNK: usize = 256;

fn redis_timeout() -> u64 {
    checkpoint::DEFAULT_RESPONSE_TIMEOUT.as_millis() as u64
}
fn router_expiry() -> u64 {
    30_000
}
fn release_ms() -> u64 {
    10
}
fn snapshot_batch() -> usize {
    32
}
fn threads() -> usize {
    1
}
fn listen() -> String {
    "0.0.0.0:9103".into()
}

impl Default for ShardConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

/// What the shard needs from outside.
pub struct Deps {
    pub bus: Bus,
    pub rules: RedisRuleStore,
    /// Redis URL and key prefix of the checkpoints.
    pub redis_url: String,
    pub prefix: String,
    /// Stamps `detected_at`.
    pub clock: Arc<dyn Clock>,
    /// Traces (continued from the keyed records that carry one).
    pub telemetry: Arc<Telemetry>,
}

/// Counters (also served as Prometheus text).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub records: u64,
    pub events: u64,
    pub watermarks: u64,
    pub late: u64,
    pub rejected: u64,
    pub matches: u64,
    pub timeouts: u64,
    pub checkpoints: u64,
    pub checkpoint_micros_total: u64,
    pub checkpoint_failures: u64,
    pub fenced: u64,
    /// Redis calls that failed (retried).
    pub redis_errors: u64,
    /// Records read again after a restore that the checkpoint already held
    /// (and events of records read again that it had released or dead-lettered).
    pub replayed_skipped: u64,
    /// Events read again after a restore because the checkpoint left them
    /// waiting for the watermark (they are held again).
    pub replayed: u64,
    /// Events sent again (their origin was read before: a router took over
    /// an events partition whose offsets its predecessor had not committed,
    /// or ingest forwarded raw records again after a restart), dropped.
    pub duplicates: u64,
    pub seeks: u64,
    /// Partitions whose log ended before their checkpoint's read position when
    /// taken (the topic recreated): read from its start as new records.
    pub log_resets: u64,
    pub restored_keys: u64,
    pub passivated: u64,
    /// Of them, passivated before their idle time to keep within `max_running_keys`.
    pub passivated_for_bound: u64,
    pub partitions: u64,
    /// Keyed partitions the consumer group assigned here (held or not read yet).
    pub assigned_partitions: u64,
    pub active_keys: u64,
    pub stored_keys: u64,
    pub partial_matches: u64,
    pub pending_events: u64,
    pub rules: u64,
    pub ready: bool,
    pub per_rule: Vec<(String, u64)>,
    /// Per rule: (evaluations, timed evaluations, their nanoseconds).
    pub rule_evals: Vec<(String, u64, u64, u64)>,
    /// Records of the assigned partitions not read yet.
    pub consumer_lag: u64,
    /// Times a keyed partition was read again for a hole in its offsets (a broker quirk; 0 on Kafka).
    pub holes_read_again: u64,
}

impl Report {
    pub fn prometheus(&self) -> String {
        let mut s = String::new();
        for (name, kind, help, v) in [
            ("cepheid_shard_records_total", "counter", "Records read from the keyed topic (not those read again after a restore).", self.records),
            ("cepheid_shard_events_total", "counter", "Event records read (watermark records and events read again after a restore excluded).", self.events),
            ("cepheid_shard_watermarks_total", "counter", "Watermark records read.", self.watermarks),
            ("cepheid_shard_late_total", "counter", "Events behind the partition's watermark, dead-lettered.", self.late),
            ("cepheid_shard_rejected_total", "counter", "Records that cannot be used (no time, not JSON), dead-lettered.", self.rejected),
            ("cepheid_shard_matches_total", "counter", "Match records published.", self.matches),
            ("cepheid_shard_timeouts_total", "counter", "Timeout records published.", self.timeouts),
            ("cepheid_shard_checkpoints_total", "counter", "Partition checkpoints written.", self.checkpoints),
            ("cepheid_shard_checkpoint_seconds_total", "counter", "Time from taking each checkpoint until Redis stored it (the partitions read on meanwhile).", 0),
            ("cepheid_shard_checkpoint_failures_total", "counter", "Checkpoints that failed (retried).", self.checkpoint_failures),
            ("cepheid_shard_redis_errors_total", "counter", "Redis calls that failed and were retried.", self.redis_errors),
            ("cepheid_shard_fenced_total", "counter", "Partitions given up because another shard took them.", self.fenced),
            ("cepheid_shard_seeks_total", "counter", "Partitions read again from their checkpoint's offset after being taken.", self.seeks),
            ("cepheid_shard_log_resets_total", "counter", "Partitions taken whose log ended before their checkpoint's read position (topic recreated): read from its start as new records.", self.log_resets),
            ("cepheid_shard_replayed_skipped_total", "counter", "Records (and events of records) read again that the checkpoint already held.", self.replayed_skipped),
            ("cepheid_shard_replayed_total", "counter", "Events read again after a restore that the checkpoint left waiting for the watermark.", self.replayed),
            ("cepheid_shard_duplicates_total", "counter", "Events sent again (their origin already read: a router took over an events partition before its predecessor committed, or ingest forwarded raw records again), dropped.", self.duplicates),
            ("cepheid_shard_restored_keys_total", "counter", "Key states loaded from Redis.", self.restored_keys),
            ("cepheid_shard_passivated_total", "counter", "Key actors stopped after idling (or to keep within max_running_keys).", self.passivated),
            ("cepheid_shard_passivated_for_bound_total", "counter", "Key actors stopped before their idle time to keep within max_running_keys.", self.passivated_for_bound),
            ("cepheid_shard_partitions", "gauge", "Partitions held (taken on their first record).", self.partitions),
            ("cepheid_shard_assigned_partitions", "gauge", "Keyed partitions the consumer group assigned to this shard, held or not read yet.", self.assigned_partitions),
            ("cepheid_shard_active_keys", "gauge", "Keys with a running actor.", self.active_keys),
            ("cepheid_shard_stored_keys", "gauge", "Keys with state, running or passivated.", self.stored_keys),
            ("cepheid_shard_partial_matches", "gauge", "Partial matches held by running actors.", self.partial_matches),
            ("cepheid_shard_pending_events", "gauge", "Events waiting for the watermark.", self.pending_events),
            ("cepheid_shard_rules", "gauge", "Enabled rules loaded.", self.rules),
            ("cepheid_shard_consumer_lag", "gauge", "Records of the assigned keyed partitions not read yet.", self.consumer_lag),
            ("cepheid_shard_holes_read_again_total", "counter", "Times a keyed partition was read again for a hole in its offsets (0 on Kafka).", self.holes_read_again),
        ] {
            let v = if name == "cepheid_shard_checkpoint_seconds_total" {
                format!("{:.6}", self.checkpoint_micros_total as f64 / 1e6)
            } else {
                v.to_string()
            };
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        }
        s.push_str("# HELP cepheid_shard_rule_matches_total Matches and timeouts published per rule.\n# TYPE cepheid_shard_rule_matches_total counter\n");
        for (rule, n) in &self.per_rule {
            s.push_str(&format!("cepheid_shard_rule_matches_total{{rule=\"{rule}\"}} {n}\n"));
        }
        s.push_str("# HELP cepheid_shard_rule_evaluations_total Times a rule's automaton was run on an event, per rule.\n# TYPE cepheid_shard_rule_evaluations_total counter\n");
        for (rule, n, _, _) in &self.rule_evals {
            s.push_str(&format!("cepheid_shard_rule_evaluations_total{{rule=\"{rule}\"}} {n}\n"));
        }
        s.push_str(&format!(
            "# HELP cepheid_shard_rule_evaluation_seconds Time of one evaluation, per rule (one evaluation in {} is timed).\n# TYPE cepheid_shard_rule_evaluation_seconds summary\n",
            cepheid_engine::cell::TIMED_EVERY
        ));
        for (rule, _, timed, nanos) in &self.rule_evals {
            s.push_str(&format!("cepheid_shard_rule_evaluation_seconds_sum{{rule=\"{rule}\"}} {:.9}\n", *nanos as f64 / 1e9));
            s.push_str(&format!("cepheid_shard_rule_evaluation_seconds_count{{rule=\"{rule}\"}} {timed}\n"));
        }
        s
    }
}

/// How often the key gauges of `/metrics` (active and stored keys, partial
/// matches) are recomputed while the shard runs: a pass over every key held.
const KEY_GAUGES_EVERY: Duration = Duration::from_secs(1);

/// Match records in flight at most, before the shard waits for their acknowledgements.
const MAX_UNACKED: usize = 10_000;

/// An event record waiting for the partition's watermark.
struct Held {
    /// The keyed record it came in (read again at restore: see [`Meta`]);
    /// `None` for an event restored from a meta of an earlier version, which
    /// holds the event itself (and so does every meta until it is released).
    offset: Option<i64>,
    source: Arc<str>,
    key: Arc<str>,
    raw: String,
    /// The `traceparent` of a traced event.
    trace: Option<Box<str>>,
}
type Pending = TimeOrdered<Held>;

/// Per origin stream (an events topic, or a raw topic via an events
/// partition: [`frame::ORIGIN_TOPIC_HEADER`]), per partition: the latest
/// origin (offset, index) taken.
type Positions = FxHashMap<String, FxHashMap<i32, (i64, u32)>>;

/// A key with state (running, passivated, or both).
struct KeySlot {
    actor: Option<ActorRef<KeyMsg>>,
    deadline: Option<i64>,
    /// Its state is in Redis as of the last checkpoint.
    stored: bool,
    /// Changed since the last checkpoint.
    dirty: bool,
    /// Its last change, numbered per partition (a checkpoint in flight clears
    /// `dirty` only if the key did not change after its snapshot; numbers are
    /// never reused, also not by a key dropped and started again).
    changes: u64,
    last_used: Instant,
    partials: usize,
    /// The slot ([`checkpoint::field`]) holding its last committed state; the
    /// next checkpoint stages it in the other one.
    slot: u8,
    /// Its entry in the stored timer index as of the last checkpoint (`None`:
    /// not known, written at the next one).
    indexed: Option<Option<i64>>,
}

impl KeySlot {
    /// Stops the key's actor; its state is in Redis as of the last checkpoint.
    fn passivate(&mut self) {
        if let Some(a) = self.actor.take() {
            a.stop(None);
        }
        self.partials = 0;
    }
}

struct Partition {
    topic: String,
    epoch: i64,
    /// Next offset to read; everything before is folded in (or held in `pending`).
    next_offset: i64,
    /// Records before this offset were read before the partition was last
    /// restored: read again, of their events only those the checkpoint left
    /// waiting for the watermark are held (see [`Meta`]).
    replay_to: i64,
    /// (source, router) → (watermark, last heard)
    routers: HashMap<(Arc<str>, String), (i64, Instant)>,
    released: i64,
    arrival: u64,
    pending: BinaryHeap<Reverse<Pending>>,
    keys: FxHashMap<Arc<str>, KeySlot>,
    timers: BTreeSet<(i64, Arc<str>)>,
    /// Keys whose stored state must be deleted at the next checkpoint, with
    /// the slot of their last committed state (kept should the key start again).
    deleted: FxHashMap<Arc<str>, u8>,
    /// The last committed checkpoint's number, and the next one's.
    seq: u64,
    next_seq: u64,
    /// Which epoch wrote which checkpoint numbers ([`Meta::lineage`]), this one's included.
    lineage: Vec<(i64, u64)>,
    /// Per origin stream and partition, the latest origin of the frame entries
    /// read ([`Meta::origins`]): an entry at or before it is a repeat (a
    /// router reading again, or ingest forwarding a raw record again).
    origins: Positions,
    /// The same for the records read again after the last restore (before
    /// `replay_to`), built up as they are read again: `origins` is as of
    /// `replay_to` and would take every one of them for a repeat. (A repeat
    /// whose first copy came before the re-read records is not held again
    /// anyway: it has the time of an event released before the checkpoint.)
    replay_origins: Positions,
    /// Repeats dropped in a row, from records at these offsets (logged when
    /// the run ends).
    repeats: Option<(u64, i64, i64)>,
    since_checkpoint: u64,
    /// Keys in the last checkpoint (to size the next one's lists).
    dirty_hint: usize,
    /// When the next checkpoint by time is due (see [`checkpoint_slot`]).
    next_checkpoint: Instant,
    /// A checkpoint of this partition is being written.
    committing: bool,
    /// When events were last released.
    last_release: Instant,
    /// The last number given to a key's change (see `KeySlot::changes`).
    change_seq: u64,
    /// Changed since the last checkpoint (records read or state changed).
    changed: bool,
    /// The keys of the checkpoint in flight whose snapshots are still to be
    /// asked for (see [`Unasked`]).
    unasked: Option<Unasked>,
}

/// A checkpoint's snapshot requests not sent yet, per key: its actor and
/// where the snapshot goes. A task sends them a few at a time, letting the
/// partition loop (and the actors it steps) run in between: asked all at
/// once, thousands of actors encode before anything else runs on the shard's
/// thread, and every match waiting on it waits as long. A key about to step
/// is asked first (so that its snapshot is as of the checkpoint).
type Unasked = Arc<Mutex<Asks>>;

/// A checkpoint's snapshot requests not sent yet: by key (a key about to step
/// is asked first), and the order to send the rest in.
#[derive(Default)]
struct Asks {
    by_key: FxHashMap<Arc<str>, Ask>,
    /// The checkpoint's keys in the order the writer stages them, and how
    /// many of them were sent for.
    order: Vec<Arc<str>>,
    sent: usize,
}

/// A snapshot request to send: the key's actor, and where the snapshot goes.
type Ask = (ActorRef<KeyMsg>, tokio::sync::oneshot::Sender<Vec<u8>>);

/// Sends a snapshot request. An actor gone drops the sender: the writer
/// reports the checkpoint incomplete (it is taken again at the next slot).
fn ask((actor, tx): Ask) {
    let _ = actor.send_message(KeyMsg::Snapshot(tx.into()));
}

/// Sends a checkpoint's snapshot requests, `batch` at a time.
async fn ask_snapshots(unasked: Unasked, batch: usize) {
    loop {
        let chunk: Vec<Ask> = {
            let mut u = unasked.lock().expect("unpoisoned");
            let mut chunk = Vec::with_capacity(batch.max(1));
            // Keys asked before their step are no longer in `by_key`.
            let u = &mut *u;
            while chunk.len() < batch.max(1) && u.sent < u.order.len() {
                if let Some(a) = u.by_key.remove(&u.order[u.sent]) {
                    chunk.push(a);
                }
                u.sent += 1;
            }
            chunk
        };
        if chunk.is_empty() {
            return;
        }
        chunk.into_iter().for_each(ask);
        // Behind the actors just asked (and whatever else is ready to run).
        tokio::task::yield_now().await;
    }
}

impl Partition {
    /// The partition's meta for checkpoint number `seq`. Its waiting events
    /// are not copied: they are read again from the topic, from the first
    /// record holding one (see [`Meta`]). Only events restored from a meta of
    /// an earlier version, which has no such offset, are carried in it.
    fn meta(&self, seq: u64) -> Meta {
        let mut from = self.next_offset;
        let mut carried = Vec::new();
        for Reverse(p) in &self.pending {
            match p.offset {
                Some(o) => from = from.min(o),
                None => carried.push(PendingRecord {
                    t: p.t,
                    arrival: p.arrival,
                    source: p.source.to_string(),
                    key: p.key.to_string(),
                    raw: p.raw.clone(),
                    trace: p.trace.as_deref().map(str::to_string),
                }),
            }
        }
        carried.sort_by_key(|p| (p.t, p.arrival));
        let mut routers: Vec<RouterMark> = self
            .routers
            .iter()
            .map(|((s, r), (w, _))| RouterMark { source: s.to_string(), router: r.clone(), watermark: *w })
            .collect();
        routers.sort_by(|a, b| (&a.source, &a.router).cmp(&(&b.source, &b.router)));
        Meta {
            offset: from,
            // Records read again after a restore that have not been reached yet stay "read".
            read: Some(self.next_offset.max(self.replay_to)),
            released: self.released,
            arrival: self.arrival,
            routers,
            pending: carried,
            seq,
            lineage: self.lineage.clone(),
            origins: {
                let mut o: Vec<checkpoint::OriginMark> = self
                    .origins
                    .iter()
                    .flat_map(|(topic, ps)| ps.iter().map(|(p, (offset, index))| checkpoint::OriginMark { topic: topic.clone(), partition: *p, offset: *offset, index: *index }))
                    .collect();
                o.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
                o
            },
        }
    }

    /// Takes router `router`'s watermark `w` for `source` (watermarks only go forward).
    fn mark(&mut self, source: &Arc<str>, router: &[u8], w: i64) {
        let now = Instant::now();
        match self.routers.iter_mut().find(|((s, r), _)| s == source && r.as_bytes() == router) {
            Some((_, e)) => {
                e.0 = e.0.max(w);
                e.1 = now;
            }
            None => {
                self.routers.insert((source.clone(), String::from_utf8_lossy(router).into_owned()), (w, now));
            }
        }
    }

    /// The watermark the routers allow: per source the minimum over routers, then the minimum over sources.
    /// (The minimum of per-source minima is the minimum over every (source, router).)
    /// Nothing is released while records read before the last restore are
    /// read again: an event they hold again may belong before the next release.
    fn allowed(&self) -> Option<i64> {
        if self.next_offset < self.replay_to {
            return None;
        }
        self.routers.values().map(|(w, _)| *w).min()
    }

    fn set_deadline(&mut self, key: &Arc<str>, deadline: Option<i64>) {
        let Some(slot) = self.keys.get_mut(key) else { return };
        if slot.deadline != deadline {
            if let Some(d) = slot.deadline {
                self.timers.remove(&(d, key.clone()));
            }
            if let Some(d) = deadline {
                self.timers.insert((d, key.clone()));
            }
            slot.deadline = deadline;
        }
    }

    fn drop_key(&mut self, key: &Arc<str>) {
        if let Some(slot) = self.keys.remove(key) {
            if let Some(d) = slot.deadline {
                self.timers.remove(&(d, key.clone()));
            }
            if let Some(a) = slot.actor {
                a.stop(None);
            }
            if slot.stored {
                self.deleted.insert(key.clone(), slot.slot);
            }
        }
    }

    fn stop_all(&mut self) {
        for slot in self.keys.values_mut() {
            if let Some(a) = slot.actor.take() {
                a.stop(None);
            }
        }
    }
}

/// A key written by a checkpoint in flight.
struct Written {
    key: Arc<str>,
    /// The change count its snapshot was taken at.
    changes: u64,
    /// The slot it is staged in.
    slot: u8,
    /// Its timer entry, when written.
    timer: Option<Option<i64>>,
}

/// What the shard keeps of a checkpoint while the writer stores it.
struct Taken {
    partition: i32,
    epoch: i64,
    /// The offset committed to the group once it is stored: where its meta
    /// reads from (the first record holding a waiting event, or the next one).
    offset: i64,
    /// This checkpoint's number.
    seq: u64,
    keys: Vec<Written>,
    /// Keys deleted, with the slot of their last committed state.
    deleted: Vec<(Arc<str>, u8)>,
    passivate: bool,
    started: std::time::Instant,
}

/// The shard's working state.
struct Shard {
    cfg: ShardConfig,
    bus: Bus,
    clock: Arc<dyn Clock>,
    book: RuleBook,
    ckpt: Checkpoints,
    /// Checkpoints to the writer task, and its answers.
    jobs: tokio::sync::mpsc::UnboundedSender<Job<Taken>>,
    done: tokio::sync::mpsc::UnboundedReceiver<Done<Taken>>,
    parts: HashMap<i32, Partition>,
    /// Match records handed to the bus and not yet known acknowledged: all are
    /// awaited before the next checkpoint is taken.
    /// (In a mutex only so that the shard is `Sync`; used through `get_mut`.)
    unacked: Mutex<Vec<cepheid_bus::Delivery>>,
    /// Why the shard must stop without checkpointing any more (a match was not delivered).
    fatal: Option<String>,
    report: Report,
    per_rule: HashMap<String, u64>,
    /// Per rule: (evaluations, timed evaluations, their nanoseconds).
    rule_evals: HashMap<String, (u64, u64, u64)>,
    /// What /metrics and /readyz serve.
    published: Arc<Mutex<Report>>,
    telemetry: Arc<Telemetry>,
    /// Every source name seen, shared by the events that name it.
    sources: Vec<Arc<str>>,
    /// A watermark moved and its release waits (see `release_interval_ms`).
    release_wanted: bool,
    /// When the key gauges of the report were last computed.
    gauges_at: Option<Instant>,
    /// Partitions of the matches topic as it exists (it may predate the
    /// configured count): the matches of keyed partition `p` go to partition
    /// `p % matches_partitions` (see [`Shard::matches_partition`]).
    matches_partitions: i32,
}

impl Shard {
    /// Takes a partition: restores its checkpoint.
    async fn acquire(&mut self, partition: i32) -> anyhow::Result<()> {
        // Without its checkpoint the partition cannot go on: wait for Redis.
        let mut backoff = cepheid_state::Backoff::default();
        let a = loop {
            match self.ckpt.acquire(&self.cfg.keyed_topic, partition).await {
                Err(checkpoint::CheckpointError::Redis(e)) if cepheid_state::redis_unavailable(&e) => {
                    self.report.redis_errors += 1;
                    self.publish();
                    let wait = backoff.next_wait();
                    tracing::warn!("matcher-shard: taking partition {partition}: redis unreachable; retrying in {} ms", wait.as_millis());
                    tokio::time::sleep(wait).await;
                }
                other => break other?,
            }
        };
        let now = Instant::now();
        let meta = a.meta.unwrap_or_default();
        let read = meta.read.unwrap_or(meta.offset);
        if read == 0 && !a.keys.is_empty() {
            tracing::warn!("matcher-shard: partition {partition}: key states without a checkpoint position; starting from the beginning");
        }
        let mut p = Partition {
            topic: self.cfg.keyed_topic.clone(),
            epoch: a.epoch,
            next_offset: meta.offset,
            replay_to: read,
            routers: meta.routers.into_iter().map(|r| ((Arc::from(r.source.as_str()), r.router), (r.watermark, now))).collect(),
            released: if read == 0 && meta.arrival == 0 { i64::MIN } else { meta.released },
            arrival: meta.arrival,
            pending: meta
                .pending
                .into_iter()
                .map(|r| {
                    // Carried in the meta (an earlier version's, or carried on since).
                    Reverse(Pending {
                        t: r.t,
                        arrival: r.arrival,
                        item: Held { offset: None, source: Arc::from(r.source.as_str()), key: Arc::from(r.key.as_str()), raw: r.raw, trace: r.trace.map(Into::into) },
                    })
                })
                .collect(),
            keys: FxHashMap::default(),
            timers: BTreeSet::new(),
            deleted: FxHashMap::default(),
            seq: meta.seq,
            next_seq: meta.seq + 1,
            lineage: checkpoint::lineage_for(meta.lineage, meta.seq, a.epoch),
            origins: {
                let mut t = Positions::default();
                for o in meta.origins {
                    t.entry(o.topic).or_default().insert(o.partition, (o.offset, o.index));
                }
                t
            },
            replay_origins: Positions::default(),
            repeats: None,
            since_checkpoint: 0,
            dirty_hint: 0,
            next_checkpoint: self.next_slot(partition),
            committing: false,
            last_release: now,
            change_seq: 0,
            changed: false,
            unasked: None,
        };
        for (k, d) in a.keys {
            let k: Arc<str> = Arc::from(k.as_str());
            // Its slot is known once loaded; its timer entry is `d`.
            p.keys.insert(k.clone(), KeySlot { actor: None, deadline: None, stored: true, dirty: false, changes: 0, last_used: now, partials: 0, slot: 1, indexed: Some(d) });
            p.set_deadline(&k, d);
        }
        self.parts.insert(partition, p);
        Ok(())
    }

    /// Gives a partition up: the checkpoint in flight, a last one (if still
    /// owned), then its actors stop.
    async fn release(&mut self, partition: i32, consumer: &Consumer) {
        self.settle(partition, consumer).await;
        if let Err(e) = self.checkpoint(partition, false).await {
            tracing::warn!("matcher-shard: releasing partition {partition}: {e}");
        }
        self.settle(partition, consumer).await;
        if let Some(mut p) = self.parts.remove(&partition) {
            p.stop_all();
        }
    }

    /// Waits until the partition has no checkpoint in flight.
    async fn settle(&mut self, partition: i32, consumer: &Consumer) {
        while self.parts.get(&partition).is_some_and(|p| p.committing) {
            match self.done.recv().await {
                Some(d) => {
                    if let Err(e) = self.committed(d, consumer) {
                        tracing::error!("{e}");
                        break;
                    }
                }
                None => break,
            }
        }
    }

    /// One record of the keyed topic. Returns false when the record must be
    /// read again after a seek (the partition was just restored behind it).
    async fn record(&mut self, m: Message, consumer: &mut Consumer) -> anyhow::Result<()> {
        if !self.parts.contains_key(&m.partition) {
            self.acquire(m.partition).await?;
            let p = self.parts.get_mut(&m.partition).expect("acquired");
            if m.offset > p.next_offset {
                // The group resumed after our checkpoint (Redis lost it, or an offset was
                // committed by hand): read again from the checkpoint. The bus delivers the
                // record at that offset next; this one comes again after it.
                tracing::warn!(
                    "matcher-shard: partition {}: the group resumes at {} but the checkpoint holds {}; reading again from {}",
                    m.partition, m.offset, p.next_offset, p.next_offset
                );
                consumer.seek(&m.topic, m.partition, p.next_offset).await?;
                self.report.seeks += 1;
                return Ok(());
            }
            if m.offset < p.next_offset {
                // Usually the group's offset behind the checkpoint: those records are
                // folded in. But a log that now ends before the position the checkpoint
                // had read to was recreated (or lost records on the broker): its offsets
                // name new records, which would otherwise be passed over as folded in.
                let read = p.replay_to.max(p.next_offset);
                match consumer.bounds(&m.topic, m.partition).await {
                    Ok((low, high)) if high < read => {
                        tracing::warn!(
                            "matcher-shard: partition {}: the topic ends at offset {high}, before the checkpoint's read position {read}: it was recreated or lost records; its records are read from {low} as new (key states and timers kept; events the checkpoint left waiting for the watermark are gone)",
                            m.partition
                        );
                        self.report.log_resets += 1;
                        p.next_offset = low;
                        p.replay_to = low;
                        if m.offset > low {
                            consumer.seek(&m.topic, m.partition, low).await?;
                            self.report.seeks += 1;
                            return Ok(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("matcher-shard: partition {}: the topic's offsets could not be read ({e}); records before the checkpoint's offset {} are taken as folded in", m.partition, p.next_offset),
                }
            }
        }
        let p = self.parts.get_mut(&m.partition).expect("acquired");
        if m.offset < p.next_offset {
            self.report.replayed_skipped += 1;
            return Ok(()); // already folded into the checkpoint
        }
        p.next_offset = m.offset + 1;
        p.since_checkpoint += 1;
        p.changed = true;
        // Read before the last restore: only its events still waiting are held again.
        let replay = m.offset < p.replay_to;
        if !replay {
            self.report.records += 1;
            if !p.replay_origins.is_empty() {
                p.replay_origins = Positions::default();
            }
        }
        let partition = m.partition;
        let offset = m.offset;
        if m.header(FRAME_HEADER).is_some() {
            // Many events in one record; the router's watermarks apply after all of them.
            let mut entries = frame::entries(&m.payload);
            let mut i = 0;
            // The latest origin per stream and partition of this record's entries: they
            // are judged against the records before it (an event routed to several key
            // signatures has one origin for all of them, in one frame).
            let mut latest: Vec<(u32, i32, (i64, u32))> = Vec::new();
            let mut repeats = 0;
            // An origin naming no stream of the record's list was logged.
            let mut unnamed = false;
            let streams: Vec<&str> = m
                .header(frame::ORIGIN_TOPIC_HEADER)
                .and_then(|h| std::str::from_utf8(h).ok())
                .map(|h| h.split(',').collect())
                .unwrap_or_default();
            // What was taken before this record, per stream of its list (looked up once per record and stream).
            let before: Vec<FxHashMap<i32, (i64, u32)>> = {
                let p = &self.parts[&partition];
                let taken = if replay { &p.replay_origins } else { &p.origins };
                streams.iter().map(|s| taken.get(*s).cloned().unwrap_or_default()).collect()
            };
            while let Some(e) = entries.next() {
                let origin = || format!("{}/{}/{}#{i}", m.topic, m.partition, m.offset);
                match e {
                    Ok(mut e) => {
                        if e.origin.is_some_and(|o| o.stream as usize >= streams.len()) {
                            // Not a stream the record names: taken as it is (a repeat of it would be taken too).
                            if !unnamed {
                                tracing::warn!("matcher-shard: {}: origin stream {} of {} named (the record's entries with such origins are taken as they are)", origin(), e.origin.map_or(0, |o| o.stream), streams.len());
                                unnamed = true;
                            }
                            e.origin = None;
                        }
                        if let Some(o) = e.origin {
                            if before[o.stream as usize].get(&o.partition).is_some_and(|t| o.position() <= *t) {
                                repeats += 1;
                                i += 1;
                                continue;
                            }
                            match latest.iter_mut().find(|(s, q, _)| *s == o.stream && *q == o.partition) {
                                Some((_, _, l)) => *l = (*l).max(o.position()),
                                None => latest.push((o.stream, o.partition, o.position())),
                            }
                        }
                        let source = self.source(e.source.as_bytes());
                        self.hold(partition, (offset, replay), Some(e.key), Some(e.time), source, e.payload, e.trace.map(str::as_bytes), origin).await?;
                    }
                    Err(_) if replay => break, // dead-lettered when first read
                    Err(e) => {
                        // The dead letter carries the damaged rest of the frame, not the good entries before it.
                        self.report.rejected += 1;
                        let reason = format!("unreadable frame: {e}; the rest of the record is dropped");
                        tracing::warn!("matcher-shard: {}: {reason}", origin());
                        self.dead_letter(entries.rest(), &reason, &origin()).await?;
                    }
                }
                i += 1;
            }
            self.taken(partition, m.offset, replay, &streams, latest, repeats);
            let marks = m.header("cepheid-watermarks").and_then(|h| {
                let w = serde_json::from_slice::<std::collections::BTreeMap<String, i64>>(h);
                if w.is_err() {
                    tracing::warn!("matcher-shard: {}/{}/{}: unreadable watermarks", m.topic, m.partition, m.offset);
                }
                w.ok()
            });
            if let Some(marks) = marks {
                let router = m.header("cepheid-router").unwrap_or_default();
                for (source, w) in marks {
                    let source = self.source(source.as_bytes());
                    self.parts.get_mut(&partition).expect("acquired").mark(&source, router, w);
                }
                self.release_if_due(partition, false).await?;
            }
            return self.maybe_checkpoint(partition).await;
        }
        let source = match m.header("cepheid-source") {
            Some(s) => self.source(s),
            None => self.source(b"default"),
        };
        // A router's watermark: a record of its own (no key), or carried by an event record.
        let header = m.header("cepheid-watermark");
        let watermark = header.and_then(|w| {
            let w = std::str::from_utf8(w).ok().and_then(|w| w.parse::<i64>().ok());
            if w.is_none() {
                tracing::warn!("matcher-shard: {}/{}/{}: unreadable watermark", m.topic, m.partition, m.offset);
            }
            w
        });
        if m.key.is_none() && header.is_some() {
            self.report.watermarks += 1;
        } else {
            let time = m.header("cepheid-time").and_then(|t| std::str::from_utf8(t).ok()).and_then(|t| t.parse::<i64>().ok());
            let origin = || format!("{}/{}/{}", m.topic, m.partition, m.offset);
            self.hold(partition, (offset, replay), m.key.as_deref(), time, source.clone(), &m.payload, m.header(TRACEPARENT), origin).await?;
        }
        if let Some(w) = watermark {
            // After the event it came with: the router sent that event first (it is not behind w).
            let p = self.parts.get_mut(&partition).expect("acquired");
            p.mark(&source, m.header("cepheid-router").unwrap_or_default(), w);
            self.release_if_due(partition, m.key.is_none()).await?;
        }
        self.maybe_checkpoint(partition).await
    }

    /// Notes a frame's latest origins as taken, and its `repeats` (entries at or
    /// before what was taken, dropped); a run of records with repeats is
    /// logged once it ends.
    fn taken(&mut self, partition: i32, offset: i64, replay: bool, streams: &[&str], latest: Vec<(u32, i32, (i64, u32))>, repeats: u64) {
        let p = self.parts.get_mut(&partition).expect("acquired");
        let taken = if replay { &mut p.replay_origins } else { &mut p.origins };
        for (stream, q, pos) in latest {
            let stream = streams[stream as usize];
            if !taken.contains_key(stream) {
                taken.insert(stream.to_string(), FxHashMap::default());
            }
            let t = taken.get_mut(stream).expect("inserted").entry(q).or_insert(pos);
            *t = (*t).max(pos);
        }
        if replay {
            // Dropped the first time too.
            self.report.replayed_skipped += repeats;
            return;
        }
        self.report.duplicates += repeats;
        match (&mut p.repeats, repeats) {
            (Some((n, _, last)), r) if r > 0 => {
                *n += r;
                *last = offset;
            }
            (None, r) if r > 0 => p.repeats = Some((r, offset, offset)),
            (Some((n, first, last)), _) => {
                tracing::info!(
                    "matcher-shard: {}/{partition}: dropped {n} events sent again (records {first}..={last}; their origins were read before: a router read its events topic again, or ingest forwarded raw records again)",
                    p.topic
                );
                p.repeats = None;
            }
            (None, _) => {}
        }
    }

    /// The shared name of a source (one allocation per source, not per event).
    fn source(&mut self, name: &[u8]) -> Arc<str> {
        if let Some(s) = self.sources.iter().find(|s| s.as_bytes() == name) {
            return s.clone();
        }
        let s: Arc<str> = Arc::from(String::from_utf8_lossy(name).as_ref());
        self.sources.push(s.clone());
        s
    }

    /// One event of the record at `offset`: held for the watermark, or
    /// dead-lettered (late, no key or time). When the record is read again after
    /// a restore (`replay`), only an event the checkpoint left waiting is held;
    /// the others were released or dead-lettered the first time.
    #[allow(clippy::too_many_arguments)]
    async fn hold(
        &mut self,
        partition: i32,
        (offset, replay): (i64, bool),
        key: Option<&[u8]>,
        time: Option<i64>,
        source: Arc<str>,
        payload: &[u8],
        trace: Option<&[u8]>,
        origin: impl Fn() -> String,
    ) -> anyhow::Result<()> {
        if replay {
            let released = self.parts[&partition].released;
            if key.is_none() || time.is_none_or(|t| t < released) {
                self.report.replayed_skipped += 1;
                return Ok(());
            }
            self.report.replayed += 1;
        } else {
            self.report.events += 1;
        }
        let (Some(key), Some(t)) = (key, time) else {
            self.report.rejected += 1;
            return self.dead_letter(payload, "keyed record without a key or a cepheid-time header", &origin()).await;
        };
        let p = self.parts.get_mut(&partition).expect("acquired");
        if t < p.released {
            self.report.late += 1;
            let reason = format!("late at the shard: event time {t} is behind the partition's watermark {}", p.released);
            if let Some(sp) = self.telemetry.continue_trace("shard.late", Kind::Consumer, trace) {
                sp.error(reason.clone());
                tracing::info!(origin = origin(), trace_id = sp.trace_id(), "matcher-shard: {reason}; dead-lettered");
            }
            return self.dead_letter(payload, &reason, &origin()).await;
        }
        p.arrival += 1;
        let raw = String::from_utf8_lossy(payload).into_owned();
        let trace = trace.map(|t| String::from_utf8_lossy(t).into());
        let key: Arc<str> = match p.keys.get_key_value(String::from_utf8_lossy(key).as_ref()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(String::from_utf8_lossy(key).as_ref()),
        };
        p.pending.push(Reverse(Pending { t, arrival: p.arrival, item: Held { offset: Some(offset), source, key, raw, trace } }));
        Ok(())
    }

    /// Releases what the routers' watermarks allow, if a release is due
    /// (`now`, or `release_interval_ms` after the last one).
    async fn release_if_due(&mut self, partition: i32, now: bool) -> anyhow::Result<()> {
        let p = self.parts.get_mut(&partition).expect("acquired");
        let due = now || p.last_release.elapsed() >= Duration::from_millis(self.cfg.release_interval_ms);
        match p.allowed().filter(|a| *a > p.released) {
            Some(allowed) if due => self.advance(partition, allowed).await?,
            Some(_) => self.release_wanted = true,
            None => {}
        }
        Ok(())
    }

    /// Sends an event (or record) that cannot be used to the dead-letter topic,
    /// with the reason and where it came from (`topic/partition/offset[#entry]`).
    async fn dead_letter(&self, payload: &[u8], reason: &str, origin: &str) -> anyhow::Result<()> {
        self.bus
            .send(&self.cfg.dead_letter_topic, None, None, payload, &[("cepheid-reason", reason.as_bytes()), ("cepheid-origin", origin.as_bytes())])
            .await?;
        Ok(())
    }

    /// Releases the events before `w` to their keys, then fires deadlines up to
    /// `w`. A release of 20 ms or more is logged (debug), to tell what holds matches up.
    async fn advance(&mut self, partition: i32, w: i64) -> anyhow::Result<()> {
        let began = std::time::Instant::now();
        let r = self.advance_inner(partition, w).await;
        let took = began.elapsed();
        if took >= Duration::from_millis(20) {
            tracing::debug!(partition, watermark = w, ms = took.as_millis() as u64, "matcher-shard: slow release");
        }
        r
    }

    /// [`Shard::advance`] itself (the release, untimed).
    async fn advance_inner(&mut self, partition: i32, w: i64) -> anyhow::Result<()> {
        let now = self.clock.now();
        let p = self.parts.get_mut(&partition).expect("held");
        // Group released events by key, keeping (time, arrival) order within each key.
        let mut order: Vec<Arc<str>> = Vec::new();
        let mut batches: FxHashMap<Arc<str>, Vec<Released>> = FxHashMap::default();
        // Per key, the trace of its last traced event (its matches continue that trace).
        let mut traces: FxHashMap<Arc<str>, Box<str>> = FxHashMap::default();
        while p.pending.peek().is_some_and(|Reverse(top)| top.t < w) {
            let Reverse(rec) = p.pending.pop().expect("peeked");
            let Pending { t, item: Held { source, key, raw, trace, .. }, .. } = rec;
            let ev = match self.book.decode_owned(&source, raw, t) {
                Ok(e) => e,
                Err(e) => {
                    self.report.rejected += 1;
                    tracing::warn!("matcher-shard: partition {partition} key {key}: event dropped: {e}");
                    continue;
                }
            };
            let list = batches.entry(key.clone()).or_insert_with(|| {
                order.push(key.clone());
                Vec::new()
            });
            list.push(Released { source, event: ev });
            if let Some(t) = trace {
                traces.insert(key, t);
            }
        }
        let due: Vec<Arc<str>> = p.timers.iter().take_while(|(d, _)| *d <= w).map(|(_, k)| k.clone()).collect();
        for k in due {
            if !batches.contains_key(&k) {
                batches.insert(k.clone(), Vec::new());
                order.push(k);
            }
        }
        p.released = w;
        p.changed = true;
        p.last_release = Instant::now();
        if order.is_empty() {
            return Ok(());
        }
        // Keys with state step in their actors (restored first when passivated);
        // a key without state steps here, and gets an actor only if it keeps some.
        let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel::<actor::Answer>();
        let mut asked = 0usize;
        // Per key: its rules and its step's reply (or why there is none).
        type KeyResult = (Arc<str>, Arc<SigRules>, Result<StepReply, String>);
        let mut results: Vec<KeyResult> = Vec::new();
        // Keys that start keeping state here: their actors are started together below.
        let mut born: Vec<(Arc<str>, KeyCell)> = Vec::new();
        // The checkpoint in flight's snapshots not asked yet (no checkpoint starts during a release).
        let unasked = self.parts[&partition].unasked.clone();
        // Passivated keys come back together, before any steps.
        let passivated: Vec<(Arc<str>, Arc<SigRules>)> = {
            let p = &self.parts[&partition];
            order
                .iter()
                .filter(|k| p.keys.get(*k).is_some_and(|s| s.actor.is_none()))
                .filter_map(|k| Some((k.clone(), self.book.signature(k.split('|').next().unwrap_or_default())?.clone())))
                .collect()
        };
        if !passivated.is_empty() {
            self.restore_passivated(partition, &passivated).await?;
        }
        for key in order {
            let events = batches.remove(&key).unwrap_or_default();
            let sig = key.split('|').next().unwrap_or_default();
            let Some(rules) = self.book.signature(sig).cloned() else {
                // No rule of this signature any more: its state goes.
                self.parts.get_mut(&partition).expect("held").drop_key(&key);
                continue;
            };
            if !self.parts[&partition].keys.contains_key(&key) {
                let mut cell = KeyCell::new();
                let out = cell.step(&rules, &events, Some(w), now);
                let partials = cell.partial_count();
                if !out.idle {
                    born.push((key.clone(), cell));
                }
                results.push((key, rules, Ok(StepReply { out, partials })));
                continue;
            }
            let actor = self.actor_for(partition, &key, &rules).await?;
            // Its snapshot for the checkpoint in flight, if not asked yet, goes before the step.
            if let Some(u) = &unasked {
                if let Some(a) = u.lock().expect("unpoisoned").by_key.remove(&key) {
                    ask(a);
                }
            }
            let reply = Outbox::new(asked, key, rules.clone(), answers.clone());
            asked += 1;
            // Not sent: the message, and with it the outbox, is dropped, which answers.
            let _ = actor.send_message(KeyMsg::Step { rules, events, watermark: Some(w), now, reply });
        }
        drop(answers);
        if !born.is_empty() {
            let (keys, cells): (Vec<_>, Vec<_>) = born.into_iter().unzip();
            let started = futures_util::future::join_all(cells.into_iter().map(|c| Actor::spawn(None, KeyActor, c))).await;
            for (key, a) in keys.iter().zip(started) {
                let (actor, _) = a.map_err(|e| anyhow::anyhow!("starting the actor of key {key}: {e}"))?;
                self.register_actor(partition, key, actor);
            }
        }
        // Every step answers once (handled, or dropped unhandled); kept in release order.
        let mut replies: Vec<actor::Answer> = Vec::with_capacity(asked);
        while replies.len() < asked {
            match answered.recv().await {
                Some(a) => replies.push(a),
                None => break,
            }
        }
        replies.sort_unstable_by_key(|a| a.0);
        results.extend(replies.into_iter().map(|(_, k, rules, r)| (k, rules, r)));
        let mut sends = Vec::new();
        let p = self.parts.get_mut(&partition).expect("held");
        for (key, book, r) in results {
            let reply: StepReply = match r {
                Ok(x) => x,
                Err(why) => {
                    tracing::warn!("matcher-shard: partition {partition} key {key}: actor failed ({why}); the key's state is dropped");
                    p.drop_key(&key);
                    continue;
                }
            };
            for e in &reply.out.evals {
                if let Some(rule) = book.rule_at(e.slot) {
                    let agg = match self.rule_evals.get_mut(rule.id()) {
                        Some(a) => a,
                        None => self.rule_evals.entry(rule.id().to_string()).or_default(),
                    };
                    agg.0 += e.count;
                    agg.1 += e.timed;
                    agg.2 += e.nanos;
                }
            }
            let span = (!traces.is_empty()).then(|| traces.get(&key)).flatten().and_then(|tp| self.telemetry.continue_trace("shard.match", Kind::Consumer, Some(tp.as_bytes())));
            if let Some(sp) = &span {
                sp.attribute("cepheid.key", key.to_string());
                sp.attribute("cepheid.records", reply.out.records.len() as i64);
            }
            let traceparent = span.as_ref().map(Traced::traceparent);
            for rec in reply.out.records {
                match rec.kind {
                    cepheid_types::MatchKind::Match => self.report.matches += 1,
                    cepheid_types::MatchKind::Timeout => self.report.timeouts += 1,
                }
                *self.per_rule.entry(rec.rule_id.clone()).or_default() += 1;
                sends.push((rec.match_id.clone(), rec.to_json_line(), traceparent.clone()));
            }
            if reply.out.idle {
                p.drop_key(&key);
            } else {
                p.change_seq += 1;
                if let Some(slot) = p.keys.get_mut(&key) {
                    slot.dirty = true;
                    slot.changes = p.change_seq;
                    slot.partials = reply.partials;
                }
                p.set_deadline(&key, reply.out.deadline);
            }
        }
        // Handed to the bus now; every match is acknowledged before the next
        // checkpoint is taken (so before anything after it is checkpointed).
        let to = Some(self.matches_partition(partition));
        for (id, line, tp) in &sends {
            let headers: Vec<(&str, &[u8])> = tp.iter().map(|t| (TRACEPARENT, t.as_bytes())).collect();
            let d = match self.bus.enqueue(&self.cfg.matches_topic, to, Some(id.as_bytes()), line.as_bytes(), &headers).await {
                Err(e) if e.is_transient() => {
                    // The producer's queue is full: wait for what is in flight, then once more.
                    self.acknowledged().await?;
                    self.bus.enqueue(&self.cfg.matches_topic, to, Some(id.as_bytes()), line.as_bytes(), &headers).await?
                }
                other => other?,
            };
            self.unacked.get_mut().expect("unpoisoned").push(d);
        }
        if self.unacked.get_mut().expect("unpoisoned").len() >= MAX_UNACKED {
            self.acknowledged().await?;
        }
        Ok(())
    }

    /// The matches partition of keyed partition `keyed`: all the matches of a
    /// release go to one partition, so a release is one batch for the broker
    /// (keyed by `match_id` they were spread over every matches partition,
    /// a batch each), and the matches of a key stay in order. The notifier
    /// drops repeats by `match_id` whichever partition they come through.
    fn matches_partition(&self, keyed: i32) -> i32 {
        keyed.rem_euclid(self.matches_partitions)
    }

    /// Waits until every match record handed to the bus is acknowledged.
    async fn acknowledged(&mut self) -> anyhow::Result<()> {
        let unacked = std::mem::take(self.unacked.get_mut().expect("unpoisoned"));
        for d in unacked {
            d.await?;
        }
        Ok(())
    }

    /// Releases what the watermark allows on partitions that held back (see `release_interval_ms`).
    async fn release_due(&mut self) -> anyhow::Result<()> {
        self.release_wanted = false;
        let due: Vec<(i32, i64)> = self.parts.iter().filter_map(|(id, p)| p.allowed().filter(|a| *a > p.released).map(|a| (*id, a))).collect();
        for (id, a) in due {
            self.advance(id, a).await?;
        }
        Ok(())
    }

    /// The running actor of a key with state (restored from Redis when passivated).
    async fn actor_for(&mut self, partition: i32, key: &Arc<str>, rules: &Arc<cepheid_engine::cell::SigRules>) -> anyhow::Result<ActorRef<KeyMsg>> {
        let p = self.parts.get_mut(&partition).expect("held");
        let slot = p.keys.get_mut(key).expect("a key with state");
        slot.last_used = Instant::now();
        if let Some(a) = &slot.actor {
            return Ok(a.clone());
        }
        self.restore_passivated(partition, &[(key.clone(), rules.clone())]).await?;
        let p = self.parts.get_mut(&partition).expect("held");
        Ok(p.keys.get(key).and_then(|s| s.actor.clone()).expect("restored"))
    }

    /// Brings back the passivated keys among `keys` (state in Redis, no
    /// actor): their cells read in one round trip per [`RESTORE_CHUNK`] keys,
    /// their actors started together. A release that wakes many keys at
    /// once (users coming back after a quiet minute) waited for one round
    /// trip per key before.
    async fn restore_passivated(&mut self, partition: i32, keys: &[(Arc<str>, Arc<cepheid_engine::cell::SigRules>)]) -> anyhow::Result<()> {
        let p = &self.parts[&partition];
        let wanted: Vec<&(Arc<str>, Arc<cepheid_engine::cell::SigRules>)> =
            keys.iter().filter(|(k, _)| p.keys.get(k).is_some_and(|s| s.actor.is_none())).collect();
        for chunk in wanted.chunks(RESTORE_CHUNK) {
            let names: Vec<&str> = chunk.iter().map(|(k, _)| &**k).collect();
            let found = self.load_retrying(partition, &names).await;
            let mut cells = Vec::with_capacity(chunk.len());
            for ((key, rules), loaded) in chunk.iter().zip(found) {
                cells.push(self.cell_from(partition, key, rules, loaded));
            }
            let started = futures_util::future::join_all(cells.into_iter().map(|c| Actor::spawn(None, KeyActor, c))).await;
            for ((key, _), a) in chunk.iter().zip(started) {
                let (actor, _) = a.map_err(|e| anyhow::anyhow!("starting the actor of key {key}: {e}"))?;
                self.register_actor(partition, key, actor);
            }
        }
        Ok(())
    }

    /// A passivated key's cell from what Redis holds for it.
    fn cell_from(&mut self, partition: i32, key: &Arc<str>, rules: &Arc<cepheid_engine::cell::SigRules>, loaded: checkpoint::Found) -> KeyCell {
        if let checkpoint::Found::Cell(l) = &loaded {
            if let Some(s) = self.parts.get_mut(&partition).and_then(|p| p.keys.get_mut(key)) {
                s.slot = l.slot;
            }
        }
        match loaded {
            checkpoint::Found::Cell(checkpoint::Loaded { cell: doc, .. }) => match cepheid_engine::cellcodec::decode(&doc) {
                Ok(snap) => {
                    let (cell, dropped) = KeyCell::restore(snap, rules, &self.book);
                    for d in dropped {
                        tracing::warn!("matcher-shard: partition {partition} key {key}: state not restored: {d}");
                    }
                    self.report.restored_keys += 1;
                    cell
                }
                Err(e) => {
                    tracing::warn!("matcher-shard: partition {partition} key {key}: stored state unreadable ({e}); starting afresh");
                    KeyCell::new()
                }
            },
            checkpoint::Found::Uncommitted => {
                // Staged by a checkpoint that was never committed: the key had no
                // state. Its slots are overwritten or deleted by the next checkpoints.
                tracing::debug!("matcher-shard: partition {partition} key {key}: only uncommitted state in Redis; starting afresh");
                KeyCell::new()
            }
            checkpoint::Found::Missing => {
                tracing::warn!("matcher-shard: partition {partition} key {key}: stored state missing; starting afresh");
                KeyCell::new()
            }
        }
    }

    /// Passivated keys' states, in the order asked. While Redis is
    /// unreachable the partition waits (back-pressure: nothing further is
    /// read), retrying with backoff.
    async fn load_retrying(&mut self, partition: i32, keys: &[&str]) -> Vec<checkpoint::Found> {
        let mut backoff = cepheid_state::Backoff::default();
        let (lineage, committed) = self.parts.get(&partition).map(|p| (p.lineage.clone(), p.seq)).unwrap_or_default();
        loop {
            match self.ckpt.load_many(&self.cfg.keyed_topic, partition, keys, &lineage, committed).await {
                Ok(found) => {
                    return found
                        .into_iter()
                        .zip(keys)
                        .map(|(f, key)| {
                            f.unwrap_or_else(|e| {
                                tracing::warn!("matcher-shard: partition {partition} key {key}: {e}");
                                checkpoint::Found::Missing
                            })
                        })
                        .collect();
                }
                Err(e) => {
                    self.report.redis_errors += 1;
                    self.publish();
                    let wait = backoff.next_wait();
                    tracing::warn!("matcher-shard: partition {partition}: loading the state of {} keys: {e}; retrying in {wait:?}", keys.len());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Records the running actor of a key (its slot made if new).
    fn register_actor(&mut self, partition: i32, key: &Arc<str>, actor: ActorRef<KeyMsg>) {
        let p = self.parts.get_mut(&partition).expect("held");
        // A key dropped since the last checkpoint and started again: its old state in
        // Redis is overwritten by the next checkpoint, or deleted if it is dropped again.
        let in_redis = p.deleted.remove(key);
        p.change_seq += 1;
        let slot = p.keys.entry(key.clone()).or_insert(KeySlot {
            actor: None,
            deadline: None,
            stored: in_redis.is_some(),
            dirty: true,
            changes: p.change_seq,
            last_used: Instant::now(),
            partials: 0,
            slot: in_redis.unwrap_or(1),
            indexed: None,
        });
        slot.actor = Some(actor);
    }

    /// When partition `partition`'s next checkpoint by time is due: its slot of
    /// the interval on the wall clock, the same on every shard.
    fn next_slot(&self, partition: i32) -> Instant {
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let at = checkpoint_slot(now_ms, self.cfg.checkpoint_interval_ms, partition, self.cfg.keyed_partitions);
        Instant::now() + Duration::from_millis((at - now_ms).max(0) as u64)
    }

    async fn maybe_checkpoint(&mut self, partition: i32) -> anyhow::Result<()> {
        let p = &self.parts[&partition];
        let due = Instant::now() >= p.next_checkpoint;
        if due && !p.changed {
            // Nothing to write in this slot: the next one.
            let next = self.next_slot(partition);
            self.parts.get_mut(&partition).expect("held").next_checkpoint = next;
            return Ok(());
        }
        let p = &self.parts[&partition];
        if !p.committing && (p.since_checkpoint >= self.cfg.checkpoint_records || (p.changed && due)) {
            self.checkpoint(partition, true).await?;
        }
        Ok(())
    }

    /// Takes the partition's checkpoint — the dirty keys' snapshots and the
    /// partition's position, all as of now — and hands it to the writer;
    /// [`Shard::committed`] takes the answer. Nothing happens while one is in flight.
    async fn checkpoint(&mut self, partition: i32, passivate: bool) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        if self.fatal.is_some() || self.parts.get(&partition).is_none_or(|p| p.committing) {
            return Ok(());
        }
        let next = self.next_slot(partition);
        // The match records sent so far are in the topic before the state after them is stored.
        let delivered: Vec<checkpoint::Deferred<Result<(), String>>> = std::mem::take(self.unacked.get_mut().expect("unpoisoned"))
            .into_iter()
            .map(|d| -> checkpoint::Deferred<Result<(), String>> { Box::pin(async move { d.await.map(|_| ()).map_err(|e| e.to_string()) }) })
            .collect();
        let p = self.parts.get_mut(&partition).expect("held");
        // Each dirty key's actor is asked for its snapshot; the request is in its
        // mailbox before any later step, so the snapshot is as of this point. The
        // actors encode in parallel and the writer collects the answers.
        let mut states = Vec::with_capacity(p.dirty_hint);
        let mut keys = Vec::with_capacity(p.dirty_hint);
        let mut gone = Vec::new();
        let mut unasked = Asks::default();
        unasked.by_key.reserve(p.dirty_hint);
        unasked.order.reserve(p.dirty_hint);
        for (k, slot) in p.keys.iter_mut().filter(|(_, s)| s.dirty) {
            let Some(a) = &slot.actor else { continue };
            if a.get_status() == ractor::ActorStatus::Stopped {
                gone.push(k.clone());
                continue;
            }
            let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
            unasked.by_key.insert(k.clone(), (a.clone(), tx));
            unasked.order.push(k.clone());
            // Redis holds (or, once written, will hold) state of this key: dropping it must delete that.
            slot.stored = true;
            let timer = (slot.indexed != Some(slot.deadline)).then_some(slot.deadline);
            let staged = 1 - slot.slot;
            states.push(checkpoint::KeyWrite {
                key: k.clone(),
                snapshot: rx,
                slot: staged,
                timer,
            });
            keys.push(Written { key: k.clone(), changes: slot.changes, slot: staged, timer });
        }
        p.dirty_hint = keys.len();
        if !unasked.order.is_empty() {
            let unasked: Unasked = Arc::new(Mutex::new(unasked));
            p.unasked = Some(unasked.clone());
            tokio::spawn(ask_snapshots(unasked, self.cfg.snapshot_batch));
        }
        for k in gone {
            tracing::warn!("matcher-shard: partition {partition} key {k}: its actor is gone; the key's state is dropped");
            p.drop_key(&k);
        }
        let deleted: Vec<(Arc<str>, u8)> = p.deleted.drain().collect();
        let seq = p.next_seq;
        p.next_seq += 1;
        p.committing = true;
        p.since_checkpoint = 0;
        p.changed = false;
        p.next_checkpoint = next;
        let n_keys = keys.len();
        let meta = p.meta(seq);
        let then = Taken { partition, epoch: p.epoch, offset: meta.offset, seq, keys, deleted: deleted.clone(), passivate, started };
        let job = Job {
            topic: p.topic.clone(),
            partition,
            epoch: p.epoch,
            delivered,
            meta,
            states,
            deleted: deleted.iter().map(|(k, _)| k.to_string()).collect(),
            then,
        };
        tracing::debug!(partition, keys = n_keys, took_us = started.elapsed().as_micros() as u64, "matcher-shard: checkpoint taken");
        self.jobs.send(job).map_err(|_| anyhow::anyhow!("matcher-shard: the checkpoint writer stopped"))
    }

    /// The writer's answer for a checkpoint: on success the keys it holds are
    /// clean (unless changed since), the offset is committed to the group and
    /// idle keys are passivated; on failure nothing is lost (the state stays
    /// here, the offset is not committed) and the next interval tries again.
    fn committed(&mut self, (t, result): Done<Taken>, consumer: &Consumer) -> anyhow::Result<()> {
        if let Err(checkpoint::CheckpointError::Undelivered(e)) = &result {
            // Its state went on past a match that is not in the matches topic: only a
            // restart from the last checkpoint (before it) gets that match out.
            let why = format!("matcher-shard: a match record could not be delivered ({e}); stopping without checkpointing past it");
            self.fatal = Some(why.clone());
            anyhow::bail!(why);
        }
        let partition = t.partition;
        // The running-keys bound, shared out over the partitions held.
        let bound = (self.cfg.max_running_keys > 0).then(|| (self.cfg.max_running_keys as usize).div_ceil(self.parts.len().max(1)));
        let Some(p) = self.parts.get_mut(&partition).filter(|p| p.epoch == t.epoch) else { return Ok(()) };
        p.committing = false;
        p.unasked = None;
        match result {
            Ok(()) => {}
            Err(checkpoint::CheckpointError::Fenced(what, mine, now)) => {
                tracing::warn!("matcher-shard: partition {what}: taken over by another shard (epoch {mine} → {now}); giving it up");
                self.report.fenced += 1;
                if let Some(mut p) = self.parts.remove(&partition) {
                    p.stop_all();
                }
                return Ok(());
            }
            Err(e) => {
                self.report.checkpoint_failures += 1;
                self.report.redis_errors += 1;
                tracing::warn!("matcher-shard: checkpoint of {}/{partition}: {e}; retrying in {} ms", p.topic, self.cfg.checkpoint_interval_ms);
                for (k, slot) in t.deleted {
                    match p.keys.get_mut(&k) {
                        // Started again meanwhile: its old state is still in Redis, in `slot`.
                        Some(s) => {
                            s.stored = true;
                            s.slot = slot;
                        }
                        None => {
                            p.deleted.insert(k, slot);
                        }
                    }
                }
                p.changed = true;
                return Ok(());
            }
        }
        self.report.checkpoints += 1;
        self.report.checkpoint_micros_total += t.started.elapsed().as_micros() as u64;
        tracing::debug!(partition, keys = t.keys.len(), ms = t.started.elapsed().as_millis() as u64, "matcher-shard: checkpoint stored");
        let applied = std::time::Instant::now();
        p.seq = t.seq;
        for Written { key: k, changes: n, slot: staged, timer } in t.keys {
            if let Some(s) = p.keys.get_mut(&k) {
                s.slot = staged;
                if let Some(t) = timer {
                    s.indexed = Some(t);
                }
                if s.changes == n {
                    s.dirty = false;
                }
            } else if let Some(s) = p.deleted.get_mut(&k) {
                // Dropped meanwhile: should it start again, its newest state is in `staged`.
                *s = staged;
            }
        }
        if let Err(e) = consumer.commit(&p.topic, partition, t.offset) {
            tracing::warn!("matcher-shard: committing {}/{partition}@{}: {e} (the Redis checkpoint stands)", p.topic, t.offset);
        }
        if t.passivate {
            let idle = Duration::from_millis(self.cfg.passivate_after_ms);
            let now = Instant::now();
            let mut running = 0usize;
            // Keys that could go (stored, not changed since): the least recently used first.
            let mut could: Vec<(Instant, Arc<str>)> = Vec::new();
            for (k, s) in p.keys.iter_mut() {
                if s.actor.is_none() {
                    continue;
                }
                if !s.dirty && s.stored && now.saturating_duration_since(s.last_used) >= idle {
                    s.passivate();
                    self.report.passivated += 1;
                    continue;
                }
                running += 1;
                if bound.is_some() && !s.dirty && s.stored {
                    could.push((s.last_used, k.clone()));
                }
            }
            if let Some(excess) = bound.and_then(|b| running.checked_sub(b)).filter(|e| *e > 0) {
                let n = excess.min(could.len());
                if n < could.len() {
                    could.select_nth_unstable(n);
                }
                for (_, k) in &could[..n] {
                    if let Some(s) = p.keys.get_mut(k) {
                        s.passivate();
                    }
                }
                self.report.passivated += n as u64;
                self.report.passivated_for_bound += n as u64;
            }
        }
        tracing::debug!(partition, took_us = applied.elapsed().as_micros() as u64, "matcher-shard: checkpoint applied");
        Ok(())
    }

    /// Drops routers not heard from for a while; their old watermarks no longer hold partitions back.
    async fn expire_routers(&mut self) -> anyhow::Result<()> {
        let limit = Duration::from_millis(self.cfg.router_expiry_ms);
        let mut advance = Vec::new();
        for (id, p) in self.parts.iter_mut() {
            let before = p.routers.len();
            p.routers.retain(|_, (_, heard)| heard.elapsed() < limit);
            if p.routers.len() != before {
                if let Some(a) = p.allowed().filter(|a| *a > p.released) {
                    advance.push((*id, a));
                }
            }
        }
        for (id, a) in advance {
            self.advance(id, a).await?;
        }
        Ok(())
    }

    /// Brings what /metrics serves up to date.
    fn publish(&mut self) {
        self.gauges_at = None;
        self.publish_tick();
    }

    /// [`Shard::publish`] at every tick: the counters at once, the key gauges
    /// (a pass over every key the shard holds) at most every [`KEY_GAUGES_EVERY`].
    fn publish_tick(&mut self) {
        let due = self.gauges_at.is_none_or(|t| t.elapsed() >= KEY_GAUGES_EVERY);
        self.refresh_report(due);
        *self.published.lock().unwrap() = self.report.clone();
    }

    fn refresh_report(&mut self, key_gauges: bool) {
        let r = &mut self.report;
        r.partitions = self.parts.len() as u64;
        if key_gauges {
            self.gauges_at = Some(Instant::now());
            (r.active_keys, r.stored_keys, r.partial_matches) = (0, 0, 0);
            for p in self.parts.values() {
                r.stored_keys += p.keys.len() as u64;
                for s in p.keys.values() {
                    r.active_keys += s.actor.is_some() as u64;
                    r.partial_matches += s.partials as u64;
                }
            }
        }
        r.pending_events = self.parts.values().map(|p| p.pending.len() as u64).sum();
        r.rules = self.book.len() as u64;
        let mut per: Vec<(String, u64)> = self.per_rule.iter().map(|(k, v)| (k.clone(), *v)).collect();
        per.sort();
        r.per_rule = per;
        let mut ev: Vec<(String, u64, u64, u64)> = self.rule_evals.iter().map(|(k, v)| (k.clone(), v.0, v.1, v.2)).collect();
        ev.sort();
        r.rule_evals = ev;
    }

    /// Takes note of a rebalance: partitions no longer assigned are given up.
    async fn follow_assignment(&mut self, consumer: &mut Consumer, assigned: &mut HashSet<i32>) {
        if let Some(now) = consumer.assignment_changed() {
            *assigned = now.iter().filter(|(t, _)| *t == self.cfg.keyed_topic).map(|(_, p)| *p).collect();
            self.report.assigned_partitions = assigned.len() as u64;
            let gone: Vec<i32> = self.parts.keys().filter(|p| !assigned.contains(p)).copied().collect();
            for p in gone {
                self.release(p, consumer).await;
            }
        }
    }

    /// Applies what the rule store reports (see the router's `follow`).
    fn follow(&mut self, u: RuleUpdate) {
        match u {
            RuleUpdate::All(all) => {
                for id in RuleUpdate::gone(&all, self.book.rules().map(|(id, _)| id)) {
                    self.book.remove(&id);
                }
                for spec in &all {
                    self.apply(spec);
                }
            }
            RuleUpdate::Upsert(spec) => self.apply(&spec),
            RuleUpdate::Delete(id) => self.book.remove(&id),
        }
    }

    fn apply(&mut self, spec: &cepheid_rules::RuleSpec) {
        if let Err(d) = self.book.upsert(spec) {
            tracing::warn!("matcher-shard: stored rule `{}` does not compile here: {d}", spec.id);
        }
    }
}

fn http(report: Arc<Mutex<Report>>) -> axum::Router {
    use axum::routing::get;
    let r2 = report.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let report = r2.clone();
                async move {
                    let r = report.lock().unwrap().clone();
                    if !r.ready {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not connected yet".to_string())
                    } else if r.rules == 0 {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no rules loaded".to_string())
                    } else {
                        (axum::http::StatusCode::OK, format!("ready: {} partitions, {} rules", r.partitions, r.rules))
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let report = report.clone();
                async move { report.lock().unwrap().prometheus() }
            }),
        )
}

/// Runs until `shutdown`, then checkpoints every partition it holds and stops.
pub async fn run(
    cfg: ShardConfig,
    engine: EngineConfig,
    deps: Deps,
    http_listener: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Report> {
    let shared = Arc::new(Mutex::new(Report::default()));
    let server = http_listener.map(|l| {
        let app = http(shared.clone());
        tokio::spawn(async move { axum::serve(l, app).await })
    });
    let bus = deps.bus.clone();
    bus.create_topic(&cfg.keyed_topic, cfg.keyed_partitions).await?;
    bus.create_topic(&cfg.matches_topic, cfg.matches_partitions).await?;
    bus.create_topic(&cfg.dead_letter_topic, 1).await?;
    let ckpt = Checkpoints::connect_with(&deps.redis_url, &deps.prefix, Duration::from_millis(cfg.redis_timeout_ms.max(1))).await?;
    let (jobs, done) = ckpt.start_writer();
    let mut shard =
        Shard {
            cfg: cfg.clone(),
            bus: bus.clone(),
            clock: deps.clock.clone(),
            book: RuleBook::new(engine),
            ckpt,
            jobs,
            done,
            parts: HashMap::new(),
            unacked: Mutex::new(Vec::new()),
            fatal: None,
            report: Report::default(),
            per_rule: HashMap::new(),
            rule_evals: HashMap::new(),
            published: shared.clone(),
            telemetry: deps.telemetry.clone(),
            sources: Vec::new(),
            release_wanted: false,
            gauges_at: None,
            matches_partitions: bus.partitions(&cfg.matches_topic).await?.max(1),
        };
    let mut updates = deps.rules.watch("matcher-shard");
    // Every rule before the first record.
    match updates.recv().await {
        Some(u) => shard.follow(u?),
        None => anyhow::bail!("matcher-shard: the rule store watch ended before the first resync"),
    }
    // Only routers write the keyed topic: a hole in its offsets is records not readable yet.
    let mut consumer = bus.subscribe(&cfg.group, &[&cfg.keyed_topic])?.contiguous();
    let mut assigned: HashSet<i32> = HashSet::new();
    shard.report.ready = true;
    // Often enough for the partitions' checkpoint slots (see `checkpoint_slot`) to keep their places.
    let mut tick = tokio::time::interval(Duration::from_millis((cfg.checkpoint_interval_ms / 64).clamp(10, 1_000)));
    let mut release = tokio::time::interval(Duration::from_millis(cfg.release_interval_ms.max(1)));
    release.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let result: anyhow::Result<()> = async {
        loop {
            shard.follow_assignment(&mut consumer, &mut assigned).await;
            if let Some(e) = &shard.fatal {
                anyhow::bail!("{e}");
            }
            tokio::select! {
                // In this order: records before the release below, which waits for them.
                biased;
                _ = &mut shutdown => break,
                u = updates.recv() => match u {
                    Some(u) => shard.follow(u?),
                    None => anyhow::bail!("matcher-shard: the rule store watch ended"),
                },
                _ = release.tick() => shard.release_due().await?,
                d = shard.done.recv() => match d {
                    Some(d) => shard.committed(d, &consumer)?,
                    None => anyhow::bail!("matcher-shard: the checkpoint writer stopped"),
                },
                _ = tick.tick() => {
                    shard.report.consumer_lag = consumer.lag().unwrap_or(0);
                    shard.report.holes_read_again = consumer.holes_read_again();
                    shard.publish_tick();
                    shard.expire_routers().await?;
                    let ids: Vec<i32> = shard.parts.keys().copied().collect();
                    for id in ids {
                        if shard.parts.contains_key(&id) {
                            shard.maybe_checkpoint(id).await?;
                        }
                    }
                }
                m = consumer.recv() => {
                    let m = match m {
                        Ok(m) => m,
                        Err(e) if e.is_transient() => { tracing::warn!("matcher-shard: bus: {e}; retrying"); continue; }
                        Err(e) => return Err(e.into()),
                    };
                    // A rebalance is reported during recv: apply it before the record.
                    shard.follow_assignment(&mut consumer, &mut assigned).await;
                    // Records of partitions not (or no longer) assigned here are stale
                    // (fetched before a rebalance): their new owner reads them.
                    if m.topic == cfg.keyed_topic && assigned.contains(&m.partition) {
                        shard.record(m, &mut consumer).await?;
                    }
                }
                // No record is waiting: what the watermark allows goes now.
                _ = std::future::ready(()), if shard.release_wanted => shard.release_due().await?,
            }
        }
        Ok(())
    }
    .await;
    // A clean stop leaves every partition checkpointed. A stop on an error
    // does not: the keys may have stepped past output that was never handed
    // to the bus (a match record refused, a step whose answer was lost), and
    // a checkpoint would carry their state past it. Its successor replays
    // from the last checkpoint instead, and the notifier drops the repeats.
    if let Err(e) = &result {
        shard.fatal.get_or_insert_with(|| e.to_string());
    }
    let ids: Vec<i32> = shard.parts.keys().copied().collect();
    for id in ids {
        if shard.fatal.is_some() {
            if let Some(mut p) = shard.parts.remove(&id) {
                p.stop_all();
            }
        } else {
            shard.release(id, &consumer).await;
        }
    }
    shard.publish();
    shard.telemetry.flush();
    if let Some(s) = server {
        s.abort();
    }
    result.map(|_| shard.report)
}

/// The first wall-clock time (ms) after `now_ms` at which partition
/// `partition` checkpoints by time: every `interval_ms`, at its own offset of
/// `interval_ms / partitions`. Every shard computes the same slots, so the
/// partitions' checkpoints never land together, whichever shards hold them
/// (two at once, on the two cores of a small machine, held every match up
/// for ~100 ms: both shards encoding, Redis storing).
fn checkpoint_slot(now_ms: i64, interval_ms: u64, partition: i32, partitions: i32) -> i64 {
    let interval = interval_ms.max(1) as i64;
    let offset = interval * i64::from(partition.rem_euclid(partitions.max(1))) / i64::from(partitions.max(1));
    let k = (now_ms - offset).div_euclid(interval) + 1;
    k * interval + offset
}

#[cfg(test)]
mod tests {
    use super::checkpoint_slot;

    #[test]
    fn checkpoint_slots_are_the_partitions_own_on_every_shard() {
        // 8 partitions, 5 s: partition p at p × 625 ms past each 5 s boundary.
        assert_eq!(checkpoint_slot(10_000, 5_000, 0, 8), 15_000, "strictly after now");
        assert_eq!(checkpoint_slot(10_001, 5_000, 1, 8), 10_625);
        assert_eq!(checkpoint_slot(10_625, 5_000, 1, 8), 15_625);
        assert_eq!(checkpoint_slot(14_999, 5_000, 7, 8), 19_375);
        // Every partition's slot differs from every other's, from any moment.
        for now in [0, 1, 4_999, 123_456_789] {
            let mut phases: Vec<i64> = (0..8).map(|p| checkpoint_slot(now, 5_000, p, 8) % 5_000).collect();
            phases.sort_unstable();
            phases.dedup();
            assert_eq!(phases.len(), 8);
            for p in 0..8 {
                let at = checkpoint_slot(now, 5_000, p, 8);
                assert!(at > now && at <= now + 5_000);
            }
        }
    }
}
