//! Partition checkpoints in Redis.
//!
//! All keys of a partition share one hash tag (`{topic-partition}`), so a
//! checkpoint is one `MULTI`/`EXEC` on one node even in a Redis cluster:
//!
//! | key | type | what |
//! |---|---|---|
//! | `{p}:shard:{T-n}:epoch` | string | ownership counter, raised by every shard that takes the partition |
//! | `{p}:shard:{T-n}:meta` | string | JSON [`Meta`]: offsets (where to read again from, what was read), watermarks, the checkpoint's number and its [`Meta::lineage`], the events-topic positions taken ([`Meta::origins`]); not the reorder buffer, whose records are read again |
//! | `{p}:shard:{T-n}:state` | hash | two slots per key, `signature|key` and `signature|key` + `"\0" "1"`: a [stamp](stamp) then the key's cell in binary form ([`cepheid_engine::cellcodec`]) |
//! | `{p}:shard:{T-n}:timers` | sorted set | `signature|key` by its earliest deadline |
//! | `{p}:shard:{T-n}:staging` | string | present from a checkpoint's first staged cells until its commit |
//!
//! Checkpoints are written by a task of their own ([`Checkpoints::start_writer`]),
//! one after the other in the order taken: a partition's loop notes its dirty
//! keys and reads on while their actors are asked for snapshots a few at a
//! time (a key's request is in its mailbox before any later step of it, so
//! every snapshot is as of the same point); the writer waits for the
//! acknowledgements of the match records sent before that point, then writes.
//! A partition has at most one checkpoint in flight.
//!
//! **Two phases, so Redis is never held for long.** A checkpoint writes
//! several megabytes of cells, and one `MULTI`/`EXEC` of all of them held Redis
//! for tens of milliseconds, every other client (the notifier's
//! de-duplication) waiting behind it. So the cells are *staged* first, a few
//! dozen per command as their snapshots come in, each into the key's slot that
//! does not hold its last committed state, stamped with the partition's epoch
//! and the checkpoint's number. Then one small `MULTI`/`EXEC` commits the
//! checkpoint: the deletions, the changed timer entries, the staged keys'
//! other slots (superseded now, so Redis holds one cell per key) and the meta
//! with the checkpoint's number. A stamped cell counts only when its checkpoint was
//! committed ([`valid`]); restoring reads both slots of a key and takes
//! the newest that counts. A crash between the phases leaves staged cells that
//! never count, and the `staging` marker: the shard that takes the partition
//! next sees it and deletes every cell that does not count before it lists
//! the partition's keys ([`Checkpoints::acquire`]).
//!
//! Fencing: every staging command is a script that writes only while the
//! partition's epoch is still the one this shard set when it took the
//! partition, and the commit `WATCH`es the epoch. A shard that lost the
//! partition in a rebalance (or was presumed dead) can never overwrite the
//! state its successor restored from; what it staged before that is not in
//! the successor's lineage, so it never counts.

use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use serde::{Deserialize, Serialize};

/// A partition's position and its events not yet released.
///
/// The events waiting for the watermark are not copied into the meta: they
/// are read again from the keyed topic. `offset` is the first record holding
/// one of them (or the next record, when none waits), `read` the next record
/// not read yet; the records in between are read again at restore, and of
/// their events exactly those at or after `released` are held again (the
/// others were released, or dead-lettered as late, the first time).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// The offset to read from at restore.
    pub offset: i64,
    /// The next offset not read yet (`None` in metas of earlier versions,
    /// where it is `offset` and `pending` holds the waiting events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<i64>,
    /// Watermark up to which events were released and deadlines fired.
    pub released: i64,
    /// Arrival counter (ties of equal event times keep arrival order).
    pub arrival: u64,
    /// Last watermark per (source, router).
    pub routers: Vec<RouterMark>,
    /// Events read but still waiting for the watermark: only those restored
    /// from a meta of an earlier version (carried on until released); the
    /// others are read again from the topic, see above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingRecord>,
    /// This checkpoint's number (0: none yet, or a checkpoint of an earlier
    /// version, whose cells are not stamped).
    #[serde(default)]
    pub seq: u64,
    /// Which epoch wrote which checkpoint numbers: `(epoch, first number)`,
    /// ascending; each owner's numbers run up to the next entry's first.
    #[serde(default)]
    pub lineage: Vec<(i64, u64)>,
    /// Per origin stream and partition, the latest origin (record offset,
    /// index in it) of the router frames' entries read up to `read`: an entry
    /// at or before it was sent again — by a router that took over the events
    /// partition before its predecessor's offsets were committed, or by ingest
    /// forwarding raw records again after a restart — and is dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<OriginMark>,
}

/// The latest position a partition took in an origin stream (see [`Meta::origins`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginMark {
    /// The stream: an events topic, or `RAW via EVENTS/P` ([`cepheid_bus::frame::ORIGIN_TOPIC_HEADER`]).
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub index: u32,
}

/// Does a cell stamped `(epoch, seq)` belong to the checkpoint whose meta has
/// this lineage and committed number (or to an earlier committed one)? Only
/// if its checkpoint number is committed and was written by that epoch: a
/// cell staged by a checkpoint that was never committed, or by a shard that
/// lost the partition, does not.
pub fn valid(lineage: &[(i64, u64)], committed: u64, epoch: i64, seq: u64) -> bool {
    if seq == 0 || seq > committed {
        return false;
    }
    let i = lineage.partition_point(|(_, first)| *first <= seq);
    i > 0 && lineage[i - 1].0 == epoch
}

/// The lineage a new owner (`epoch`) of a partition whose last committed
/// checkpoint is `committed` writes under: it writes the numbers from the next
/// one on (what an earlier owner staged under them without committing never
/// counts). Owners that committed nothing are dropped from the end: their
/// entries name no number any more (the next entry starts at the same one),
/// so a partition taken over and over without a checkpoint in between (a
/// crash loop, a rebalance storm) does not grow its meta.
pub fn lineage_for(mut lineage: Vec<(i64, u64)>, committed: u64, epoch: i64) -> Vec<(i64, u64)> {
    while lineage.last().is_some_and(|(_, first)| *first > committed) {
        lineage.pop();
    }
    lineage.push((epoch, committed + 1));
    lineage
}

const STAMP: [u8; 2] = [0xC5, 0x01];

/// A stored cell's stamp: the epoch and the checkpoint number that staged it.
pub type Stamp = (i64, u64);

/// A stored cell's prefix: the magic bytes `C5 01`, then the epoch and the
/// checkpoint number that staged it (LEB128 varints).
pub fn stamp(epoch: i64, seq: u64, cell: &[u8]) -> Vec<u8> {
    let (head, n) = stamp_head(epoch, seq);
    let mut out = Vec::with_capacity(n + cell.len());
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(cell);
    out
}

/// The stamp's bytes (at most 2 + 10 + 10) and how many of them are used.
fn stamp_head(epoch: i64, seq: u64) -> ([u8; 22], usize) {
    let mut head = [0u8; 22];
    head[..2].copy_from_slice(&STAMP);
    let mut n = 2;
    for mut x in [epoch as u64, seq] {
        while x >= 0x80 {
            head[n] = (x as u8) | 0x80;
            n += 1;
            x >>= 7;
        }
        head[n] = x as u8;
        n += 1;
    }
    (head, n)
}

/// A cell as one Redis argument, [`stamp`]ed: written straight into the
/// command, with no stamped copy of the cell in between (a checkpoint stages
/// megabytes of cells).
struct Stamped<'a> {
    head: ([u8; 22], usize),
    cell: &'a [u8],
}

impl<'a> Stamped<'a> {
    fn new(epoch: i64, seq: u64, cell: &'a [u8]) -> Self {
        Stamped { head: stamp_head(epoch, seq), cell }
    }
    fn len(&self) -> usize {
        self.head.1 + self.cell.len()
    }
}

impl redis::ToRedisArgs for Stamped<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut w = out.writer_for_next_arg();
        // Writes into an in-memory command buffer: they cannot fail.
        let _ = w.write_all(&self.head.0[..self.head.1]);
        let _ = w.write_all(self.cell);
    }
}

/// Splits a stored cell into its stamp (`None`: a cell of an earlier version,
/// which has none) and the cell. `Err` when the stamp is cut short.
pub fn unstamp(stored: &[u8]) -> Result<(Option<Stamp>, &[u8]), String> {
    let Some(mut rest) = stored.strip_prefix(&STAMP[..]) else { return Ok((None, stored)) };
    let mut read = || -> Result<u64, String> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, r) = rest.split_first().ok_or("stamp cut short")?;
            rest = r;
            x |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(x);
            }
        }
        Err("stamp varint too long".into())
    };
    let epoch = read()? as i64;
    let seq = read()?;
    Ok((Some((epoch, seq)), rest))
}

/// The hash field of a key's slot (0 or 1). Slot 0 is the key itself (where
/// earlier versions stored the key's only cell); slot 1 adds a NUL and `1`,
/// which no key holds (key values are JSON text, a NUL in them escaped).
pub fn field(key: &str, slot: u8) -> String {
    if slot == 0 {
        key.to_string()
    } else {
        format!("{key}{SLOT1}")
    }
}

/// What slot 1's field adds to the key: a NUL, then `1`.
const SLOT1: &str = "\u{0}1";

/// The key of a hash field ([`field`] reversed).
fn key_of(field: &str) -> &str {
    field.strip_suffix(SLOT1).unwrap_or(field)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterMark {
    pub source: String,
    pub router: String,
    pub watermark: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingRecord {
    pub t: i64,
    pub arrival: u64,
    pub source: String,
    /// `signature|key` as on the keyed topic.
    pub key: String,
    pub raw: String,
    /// The event's `traceparent`, when it is traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// What a shard finds when it takes a partition.
#[derive(Debug, Default)]
pub struct Acquired {
    pub epoch: i64,
    pub meta: Option<Meta>,
    /// Keys with stored state, with their earliest deadline.
    pub keys: Vec<(String, Option<i64>)>,
}

/// A key's state loaded from its checkpoint.
#[derive(Debug, PartialEq)]
pub struct Loaded {
    /// The key's cell (unstamped).
    pub cell: Vec<u8>,
    /// The slot it was in (the next checkpoint writes the other).
    pub slot: u8,
}

/// What [`Checkpoints::load`] finds of a key.
#[derive(Debug, PartialEq)]
pub enum Found {
    Cell(Loaded),
    /// Only cells staged by checkpoints never committed (a shard stopped
    /// between staging and committing): the key has no state.
    Uncommitted,
    /// Nothing at all.
    Missing,
}

/// A key's write in a checkpoint: its snapshot to come, the slot to stage it
/// in, and its timer entry when that changed (`Some(None)`: remove it).
pub struct KeyWrite {
    pub key: std::sync::Arc<str>,
    pub snapshot: Snapshot,
    pub slot: u8,
    pub timer: Option<Option<i64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("partition {0}: taken over by another shard (epoch {1} → {2})")]
    Fenced(String, i64, i64),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("checkpoint of {0} is unreadable: {1}")]
    Corrupt(String, String),
    #[error("checkpoint not taken: {0}")]
    Incomplete(String),
    #[error("a match record was not delivered: {0}")]
    Undelivered(String),
}

/// The checkpoint store of one shard. Checkpoints go through a connection
/// used by nothing else, by one task (`WATCH` is per connection, so two
/// checkpoints must never interleave on it); taking partitions and loading
/// keys use another. Both reconnect by themselves after Redis restarts or
/// the network drops.
pub struct Checkpoints {
    prefix: String,
    writer: ConnectionManager,
    reader: ConnectionManager,
}

/// How long a Redis command of the checkpoint store may take to be
/// answered before it counts as failed (see [`Checkpoints::connect_with`]).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Something the writer waits for.
pub type Deferred<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// A key's snapshot to come (an error: the key's actor stopped before answering).
pub type Snapshot = tokio::sync::oneshot::Receiver<Vec<u8>>;

/// A checkpoint handed to the writer, with what its taker needs back (`then`).
pub struct Job<T> {
    pub topic: String,
    pub partition: i32,
    pub epoch: i64,
    /// Acknowledgements of the match records sent before the checkpoint:
    /// all must succeed before it is written.
    pub delivered: Vec<Deferred<Result<(), String>>>,
    /// The partition's meta, with this checkpoint's number and lineage.
    pub meta: Meta,
    pub states: Vec<KeyWrite>,
    /// Keys whose state is gone (both slots and the timer entry are deleted).
    pub deleted: Vec<String>,
    pub then: T,
}

/// What the writer answers for a [`Job`].
pub type Done<T> = (T, Result<(), CheckpointError>);

impl Checkpoints {
    /// Connects with [`DEFAULT_RESPONSE_TIMEOUT`].
    pub async fn connect(url: &str, prefix: &str) -> Result<Checkpoints, CheckpointError> {
        Self::connect_with(url, prefix, DEFAULT_RESPONSE_TIMEOUT).await
    }

    /// Connects; a command not answered within `response_timeout` fails (a
    /// checkpoint is then taken again whole at the next slot, a key's load is
    /// retried). The `redis` crate's own default, 500 ms, is far too short for
    /// a checkpoint: a Redis sharing busy cores with the shard and the broker
    /// answered staging commands after up to 1.4 s, so every checkpoint of a
    /// saturated shard failed, none committed, and each next one wrote more.
    pub async fn connect_with(url: &str, prefix: &str, response_timeout: Duration) -> Result<Checkpoints, CheckpointError> {
        let client = redis::Client::open(url)?;
        let writer = cepheid_state::connection_manager(&client, response_timeout).await?;
        let reader = cepheid_state::connection_manager(&client, response_timeout).await?;
        Ok(Checkpoints { prefix: prefix.to_string(), writer, reader })
    }

    fn base(&self, topic: &str, partition: i32) -> String {
        base(&self.prefix, topic, partition)
    }

    /// Starts the writer task: jobs are written in the order sent, and each
    /// answered on the returned receiver. The task ends when the sender is dropped.
    pub fn start_writer<T: Send + 'static>(&self) -> (mpsc::UnboundedSender<Job<T>>, mpsc::UnboundedReceiver<Done<T>>) {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job<T>>();
        let (done, answers) = mpsc::unbounded_channel();
        let mut conn = self.writer.clone();
        let prefix = self.prefix.clone();
        tokio::spawn(async move {
            let script = redis::Script::new(FENCED);
            while let Some(job) = rx.recv().await {
                let r = async {
                    for d in job.delivered {
                        d.await.map_err(CheckpointError::Undelivered)?;
                    }
                    let b = base(&prefix, &job.topic, job.partition);
                    let (epoch_key, state, marker) = (format!("{b}:epoch"), format!("{b}:state"), format!("{b}:staging"));
                    let what = format!("{}/{}", job.topic, job.partition);
                    // Phase 1: stage the cells as their snapshots come, a chunk per command.
                    let mut timers = Vec::new();
                    // The other slot of each staged key: its state is superseded once committed.
                    let mut superseded = Vec::with_capacity(job.states.len());
                    let stage = || fenced(&script, &epoch_key, &state, Some(&marker), job.epoch, "HSET");
                    let mut inv = stage();
                    let (mut n, mut bytes) = (0usize, 0usize);
                    for w in job.states {
                        let Ok(doc) = w.snapshot.await else {
                            return Err(CheckpointError::Incomplete(format!("key {}: its actor stopped before its snapshot", w.key)));
                        };
                        let doc = Stamped::new(job.epoch, job.meta.seq, &doc);
                        bytes += doc.len();
                        inv.arg(field(&w.key, w.slot)).arg(doc);
                        superseded.push(field(&w.key, 1 - w.slot));
                        n += 1;
                        if let Some(t) = w.timer {
                            timers.push((w.key, t));
                        }
                        if n >= STAGE_KEYS || bytes >= STAGE_BYTES {
                            stage_chunk(&mut conn, &inv, &epoch_key, &what, job.epoch).await?;
                            inv = stage();
                            (n, bytes) = (0, 0);
                        }
                    }
                    if n > 0 {
                        stage_chunk(&mut conn, &inv, &epoch_key, &what, job.epoch).await?;
                    }
                    // Phase 2: commit.
                    let w = Commit { meta: &job.meta, timers: &timers, superseded: &superseded, deleted: &job.deleted };
                    commit(&mut conn, &prefix, &job.topic, job.partition, job.epoch, w).await
                }
                .await;
                if done.send((job.then, r)).is_err() {
                    break;
                }
            }
        });
        (jobs, answers)
    }

    /// Takes the partition: raises its epoch and reads its checkpoint.
    pub async fn acquire(&mut self, topic: &str, partition: i32) -> Result<Acquired, CheckpointError> {
        let b = self.base(topic, partition);
        let mut c = self.reader.clone();
        let epoch: i64 = redis::cmd("INCR").arg(format!("{b}:epoch")).query_async(&mut c).await?;
        let meta: Option<String> = redis::cmd("GET").arg(format!("{b}:meta")).query_async(&mut c).await?;
        let meta = match meta {
            Some(m) => Some(serde_json::from_str(&m).map_err(|e| CheckpointError::Corrupt(format!("{b}:meta"), e.to_string()))?),
            None => None,
        };
        let interrupted: bool = redis::cmd("EXISTS").arg(format!("{b}:staging")).query_async(&mut c).await?;
        if interrupted {
            let (lineage, committed) = meta.as_ref().map_or((Vec::new(), 0), |m: &Meta| (m.lineage.clone(), m.seq));
            sweep(&mut c, &b, epoch, &lineage, committed).await?;
        }
        let mut names: Vec<String> = redis::cmd("HKEYS").arg(format!("{b}:state")).query_async(&mut c).await?;
        // Both slots of a key, once.
        for n in names.iter_mut() {
            n.truncate(key_of(n).len());
        }
        names.sort_unstable();
        names.dedup();
        let timers: Vec<(String, f64)> =
            redis::cmd("ZRANGE").arg(format!("{b}:timers")).arg(0).arg(-1).arg("WITHSCORES").query_async(&mut c).await?;
        let timers: std::collections::HashMap<String, i64> = timers.into_iter().map(|(k, s)| (k, s as i64)).collect();
        let keys = names.into_iter().map(|k| {
            let d = timers.get(&k).copied();
            (k, d)
        });
        Ok(Acquired { epoch, meta, keys: keys.collect() })
    }

    /// A passivated key's state: of its two slots, the newest whose
    /// checkpoint counts by `meta`'s lineage and number ([`valid`]).
    /// `Err(Corrupt)` when a slot's stamp is unreadable.
    pub async fn load(&self, topic: &str, partition: i32, key: &str, lineage: &[(i64, u64)], committed: u64) -> Result<Found, CheckpointError> {
        self.load_many(topic, partition, &[key], lineage, committed).await?.pop().expect("one key asked")
    }

    /// [`Checkpoints::load`] for many keys of a partition in one round trip
    /// (a pipeline of `HMGET`s), answered in the order asked: the outer error
    /// is the round trip's, an inner one a key's unreadable stamp.
    pub async fn load_many(
        &self,
        topic: &str,
        partition: i32,
        keys: &[&str],
        lineage: &[(i64, u64)],
        committed: u64,
    ) -> Result<Vec<Result<Found, CheckpointError>>, CheckpointError> {
        let mut c = self.reader.clone();
        let state = format!("{}:state", self.base(topic, partition));
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HMGET").arg(&state).arg(field(key, 0)).arg(field(key, 1));
        }
        let answers: Vec<Slots> = pipe.query_async(&mut c).await?;
        Ok(keys.iter().zip(answers).map(|(key, slots)| pick(&state, key, slots, lineage, committed)).collect())
    }
}

/// A key's two stored slots, as read.
type Slots = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Of a key's two slots, the newest cell that counts under `lineage`.
fn pick(state: &str, key: &str, slots: Slots, lineage: &[(i64, u64)], committed: u64) -> Result<Found, CheckpointError> {
    let mut best: Option<(u64, Loaded)> = None;
    let mut found = false;
    for (slot, doc) in [(0u8, slots.0), (1u8, slots.1)] {
        let Some(doc) = doc else { continue };
        found = true;
        let (st, cell) = unstamp(&doc).map_err(|e| CheckpointError::Corrupt(format!("{state} {key}"), e))?;
        let seq = match st {
            // A cell of an earlier version: older than any stamped one.
            None => 0,
            Some((e, s)) if valid(lineage, committed, e, s) => s,
            Some(_) => continue,
        };
        if best.as_ref().is_none_or(|(b, _)| seq > *b) {
            best = Some((seq, Loaded { cell: cell.to_vec(), slot }));
        }
    }
    Ok(match best {
        Some((_, l)) => Found::Cell(l),
        None if found => Found::Uncommitted,
        None => Found::Missing,
    })
}

/// Runs command ARGV[2] on the state hash (KEYS[2]) with ARGV[3..] — staging
/// (`HSET`) or sweeping (`HDEL`) — only while the epoch (KEYS[1]) is still
/// ARGV[1], and sets the staging marker (KEYS[3]) when given; answers 1 when
/// done, 0 when fenced.
const FENCED: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call(ARGV[2], KEYS[2], unpack(ARGV, 3))
if KEYS[3] then redis.call('SET', KEYS[3], '1') end
return 1
";

/// A [`FENCED`] command, its fields and values still to be added.
fn fenced<'a>(script: &'a redis::Script, epoch_key: &str, state: &str, marker: Option<&str>, epoch: i64, cmd: &str) -> redis::ScriptInvocation<'a> {
    let mut inv = script.key(epoch_key);
    inv.key(state);
    if let Some(m) = marker {
        inv.key(m);
    }
    inv.arg(epoch).arg(cmd);
    inv
}

/// Runs one staging command; `Fenced` (with the epoch found) when the
/// partition is no longer this shard's.
async fn stage_chunk(conn: &mut ConnectionManager, inv: &redis::ScriptInvocation<'_>, epoch_key: &str, what: &str, epoch: i64) -> Result<(), CheckpointError> {
    let written: i64 = inv.invoke_async(conn).await?;
    if written == 1 {
        return Ok(());
    }
    let now: Option<i64> = redis::cmd("GET").arg(epoch_key).query_async(conn).await?;
    Err(CheckpointError::Fenced(what.to_string(), epoch, now.unwrap_or(0)))
}

/// Keys per staging command, and the bytes after which a command is sent
/// sooner: a few dozen cells per command, where one transaction held thousands.
const STAGE_KEYS: usize = 64;
const STAGE_BYTES: usize = 128 * 1024;

/// Deletes the cells that do not count — staged by a checkpoint that was
/// never committed — after a shard stopped between a checkpoint's phases.
/// Cells of this shard's own `epoch` are left alone (it may be staging
/// already); stops quietly when another shard takes the partition meanwhile
/// (its own first checkpoint is then fenced).
async fn sweep(c: &mut ConnectionManager, b: &str, epoch: i64, lineage: &[(i64, u64)], committed: u64) -> Result<(), CheckpointError> {
    let (epoch_key, state) = (format!("{b}:epoch"), format!("{b}:state"));
    let script = redis::Script::new(FENCED);
    let mut cursor: u64 = 0;
    let mut swept = 0usize;
    loop {
        let (next, page): (u64, Vec<(String, Vec<u8>)>) =
            redis::cmd("HSCAN").arg(&state).arg(cursor).arg("COUNT").arg(256).query_async(c).await?;
        let garbage: Vec<&String> = page
            .iter()
            .filter(|(_, v)| matches!(unstamp(v), Ok((Some((e, s)), _)) if e != epoch && !valid(lineage, committed, e, s)))
            .map(|(f, _)| f)
            .collect();
        if !garbage.is_empty() {
            let mut inv = fenced(&script, &epoch_key, &state, None, epoch, "HDEL");
            inv.arg(&garbage);
            let done: i64 = inv.invoke_async(c).await?;
            if done == 0 {
                tracing::debug!("{state}: taken by another shard while sweeping; stopped");
                return Ok(());
            }
            swept += garbage.len();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    tracing::info!("{state}: a checkpoint was cut short between its phases; deleted its {swept} staged cells that never counted");
    Ok(())
}

fn base(prefix: &str, topic: &str, partition: i32) -> String {
    format!("{prefix}:shard:{{{topic}-{partition}}}")
}

/// Keys per command of a checkpoint's commit.
const CHUNK: usize = 512;

/// What a checkpoint's commit writes (its cells are staged already).
struct Commit<'a> {
    meta: &'a Meta,
    /// Changed timer entries (`None`: removed).
    timers: &'a [(std::sync::Arc<str>, Option<i64>)],
    /// The fields of the staged keys' other slots, deleted so that Redis holds
    /// one cell per key, not two.
    superseded: &'a [String],
    /// Keys whose state is gone.
    deleted: &'a [String],
}

/// Commits a checkpoint whose cells are staged, atomically, if this shard
/// still owns the partition: deletions, changed timer entries, the meta.
async fn commit(conn: &mut ConnectionManager, prefix: &str, topic: &str, partition: i32, epoch: i64, w: Commit<'_>) -> Result<(), CheckpointError> {
    let Commit { meta, timers, superseded, deleted } = w;
    let b = base(prefix, topic, partition);
    let epoch_key = format!("{b}:epoch");
    redis::cmd("WATCH").arg(&epoch_key).query_async::<()>(conn).await?;
    let current: Option<i64> = redis::cmd("GET").arg(&epoch_key).query_async(conn).await?;
    if current != Some(epoch) {
        redis::cmd("UNWATCH").query_async::<()>(conn).await?;
        return Err(CheckpointError::Fenced(format!("{topic}/{partition}"), epoch, current.unwrap_or(0)));
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    let state = format!("{b}:state");
    let timer_key = format!("{b}:timers");
    // Many fields per command (Redis spends about as much on a command as on a field).
    for ks in deleted.chunks(CHUNK) {
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(&state);
        for k in ks {
            hdel.arg(field(k, 0)).arg(field(k, 1));
        }
        pipe.add_command(hdel).ignore();
        pipe.cmd("ZREM").arg(&timer_key).arg(ks).ignore();
    }
    for fs in superseded.chunks(CHUNK) {
        pipe.cmd("HDEL").arg(&state).arg(fs).ignore();
    }
    for chunk in timers.chunks(CHUNK) {
        let (mut zadd, mut zrem) = (redis::cmd("ZADD"), redis::cmd("ZREM"));
        zadd.arg(&timer_key);
        zrem.arg(&timer_key);
        let (mut adds, mut rems) = (0, 0);
        for (k, deadline) in chunk {
            match deadline {
                Some(d) => {
                    zadd.arg(*d).arg(&**k);
                    adds += 1;
                }
                None => {
                    zrem.arg(&**k);
                    rems += 1;
                }
            }
        }
        if adds > 0 {
            pipe.add_command(zadd).ignore();
        }
        if rems > 0 {
            pipe.add_command(zrem).ignore();
        }
    }
    let meta = serde_json::to_string(meta).expect("meta serialises");
    pipe.cmd("DEL").arg(format!("{b}:staging")).ignore();
    pipe.cmd("SET").arg(format!("{b}:meta")).arg(meta);
    // EXEC answers nil when the watched epoch changed in between.
    let done: Option<(redis::Value,)> = pipe.query_async(conn).await?;
    match done {
        Some(_) => Ok(()),
        None => Err(CheckpointError::Fenced(format!("{topic}/{partition}"), epoch, -1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_read_back_and_unstamped_cells_are_of_an_earlier_version() {
        let s = stamp(300, 1 << 40, b"\xCE\x50cell");
        assert_eq!(unstamp(&s).unwrap(), (Some((300, 1 << 40)), &b"\xCE\x50cell"[..]));
        assert_eq!(unstamp(b"\xCE\x50cell").unwrap(), (None, &b"\xCE\x50cell"[..]));
        assert!(unstamp(&s[..3]).is_err());
    }

    #[test]
    fn a_stamped_argument_is_the_stamped_cell() {
        use redis::ToRedisArgs;
        for (epoch, seq) in [(0, 0), (1, 1), (300, 1 << 40), (i64::MAX, u64::MAX)] {
            let cell = b"\xCE\x50cell";
            let args = Stamped::new(epoch, seq, cell).to_redis_args();
            assert_eq!(args, vec![stamp(epoch, seq, cell)]);
            assert_eq!(Stamped::new(epoch, seq, cell).len(), args[0].len());
            assert_eq!(unstamp(&args[0]).unwrap(), (Some((epoch, seq)), &cell[..]));
        }
    }

    #[test]
    fn a_cell_counts_only_when_its_number_was_committed_by_its_epoch() {
        // Epoch 4 committed 1..=9; epoch 6 took over and committed 10..=12.
        let lineage = [(4, 1), (6, 10)];
        assert!(valid(&lineage, 12, 4, 9));
        assert!(valid(&lineage, 12, 6, 12));
        // Staged by a checkpoint not committed (yet).
        assert!(!valid(&lineage, 12, 6, 13));
        // Staged by epoch 4 after its last commit: its successor took 10 on.
        assert!(!valid(&lineage, 12, 4, 10));
        // Epoch 5 took the partition and never committed.
        assert!(!valid(&lineage, 12, 5, 10));
        assert!(!valid(&[], 0, 4, 1));
    }

    #[test]
    fn slot_fields_name_their_key() {
        assert_eq!(field("userId|7", 0), "userId|7");
        assert_eq!(key_of(&field("userId|7", 1)), "userId|7");
        assert_eq!(key_of(&field("userId|7", 0)), "userId|7");
    }
}
