//! Partition checkpoints in Redis.
//!
//! All keys of a partition share one hash tag (`{topic-partition}`), so a
//! checkpoint is one `MULTI`/`EXEC` on one node even in a Redis cluster:
//!
//! | key | type | what |
//! |---|---|---|
//! | `{p}:shard:{T-n}:epoch` | string | ownership counter, raised by every shard that takes the partition |
//! | `{p}:shard:{T-n}:meta` | string | JSON [`Meta`]: next offset, watermarks, the reorder buffer |
//! | `{p}:shard:{T-n}:state` | hash | `signature|key` → the key's cell in binary form ([`cepheid_engine::cellcodec`]; JSON in checkpoints of earlier versions) |
//! | `{p}:shard:{T-n}:timers` | sorted set | `signature|key` by its earliest deadline |
//!
//! Checkpoints are written by a task of their own ([`Checkpoints::start_writer`]),
//! one after the other in the order taken: a partition's loop notes its dirty
//! keys and reads on while their actors are asked for snapshots a few at a
//! time (a key's request is in its mailbox before any later step of it, so
//! every snapshot is as of the same point); the writer waits for the snapshots and for the
//! acknowledgements of the match records sent before that point, then writes.
//! A partition has at most one checkpoint in flight.
//!
//! Fencing: a checkpoint `WATCH`es the epoch and is written only while the
//! epoch is still the one this shard set when it took the partition. A shard
//! that lost the partition in a rebalance (or was presumed dead) can never
//! overwrite the state its successor restored from.

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use serde::{Deserialize, Serialize};

/// A partition's position and its events not yet released.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// The next offset to read: everything before it is in this checkpoint.
    pub offset: i64,
    /// Watermark up to which events were released and deadlines fired.
    pub released: i64,
    /// Arrival counter (ties of equal event times keep arrival order).
    pub arrival: u64,
    /// Last watermark per (source, router).
    pub routers: Vec<RouterMark>,
    /// Events read but still waiting for the watermark.
    pub pending: Vec<PendingRecord>,
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

/// The writes of one checkpoint.
#[derive(Debug, Default)]
pub struct Writes {
    pub meta: Meta,
    /// Key states to store, with the key's deadline.
    pub states: Vec<(String, Vec<u8>, Option<i64>)>,
    /// Keys whose state is gone.
    pub deleted: Vec<String>,
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

/// Something the writer waits for.
pub type Deferred<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// A key's snapshot to come (`None`: the key's actor stopped before answering).
pub type Snapshot = Deferred<Option<Vec<u8>>>;

/// A checkpoint handed to the writer, with what its taker needs back (`then`).
pub struct Job<T> {
    pub topic: String,
    pub partition: i32,
    pub epoch: i64,
    /// Acknowledgements of the match records sent before the checkpoint:
    /// all must succeed before it is written.
    pub delivered: Vec<Deferred<Result<(), String>>>,
    pub meta: Meta,
    /// Key snapshots to come, with each key's deadline.
    pub states: Vec<(String, Snapshot, Option<i64>)>,
    pub deleted: Vec<String>,
    pub then: T,
}

/// What the writer answers for a [`Job`].
pub type Done<T> = (T, Result<(), CheckpointError>);

impl Checkpoints {
    pub async fn connect(url: &str, prefix: &str) -> Result<Checkpoints, CheckpointError> {
        let client = redis::Client::open(url)?;
        let writer = client.get_connection_manager().await?;
        let reader = client.get_connection_manager().await?;
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
            while let Some(job) = rx.recv().await {
                let r = async {
                    for d in job.delivered {
                        d.await.map_err(CheckpointError::Undelivered)?;
                    }
                    let mut w = Writes { meta: job.meta, states: Vec::with_capacity(job.states.len()), deleted: job.deleted };
                    for (k, doc, deadline) in job.states {
                        match doc.await {
                            Some(doc) => w.states.push((k, doc, deadline)),
                            None => return Err(CheckpointError::Incomplete(format!("key {k}: its actor stopped before its snapshot"))),
                        }
                    }
                    commit(&mut conn, &prefix, &job.topic, job.partition, job.epoch, &w).await
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
        let names: Vec<String> = redis::cmd("HKEYS").arg(format!("{b}:state")).query_async(&mut c).await?;
        let timers: Vec<(String, f64)> =
            redis::cmd("ZRANGE").arg(format!("{b}:timers")).arg(0).arg(-1).arg("WITHSCORES").query_async(&mut c).await?;
        let timers: std::collections::HashMap<String, i64> = timers.into_iter().map(|(k, s)| (k, s as i64)).collect();
        let keys = names.into_iter().map(|k| {
            let d = timers.get(&k).copied();
            (k, d)
        });
        Ok(Acquired { epoch, meta, keys: keys.collect() })
    }

    /// A passivated key's state.
    pub async fn load(&self, topic: &str, partition: i32, key: &str) -> Result<Option<Vec<u8>>, CheckpointError> {
        let mut c = self.reader.clone();
        Ok(redis::cmd("HGET").arg(format!("{}:state", self.base(topic, partition))).arg(key).query_async(&mut c).await?)
    }
}

fn base(prefix: &str, topic: &str, partition: i32) -> String {
    format!("{prefix}:shard:{{{topic}-{partition}}}")
}

/// Writes a checkpoint atomically, if this shard still owns the partition.
/// Keys written per Redis command of a checkpoint.
const CHUNK: usize = 512;

async fn commit(conn: &mut ConnectionManager, prefix: &str, topic: &str, partition: i32, epoch: i64, w: &Writes) -> Result<(), CheckpointError> {
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
    let timers = format!("{b}:timers");
    // Deletions first: a key dropped and started again since the last checkpoint is stored.
    // Many fields per command (Redis spends about as much on a command as on a field).
    for ks in w.deleted.chunks(CHUNK) {
        pipe.cmd("HDEL").arg(&state).arg(ks).ignore();
        pipe.cmd("ZREM").arg(&timers).arg(ks).ignore();
    }
    for chunk in w.states.chunks(CHUNK) {
        let mut hset = redis::cmd("HSET");
        hset.arg(&state);
        let (mut zadd, mut zrem) = (redis::cmd("ZADD"), redis::cmd("ZREM"));
        zadd.arg(&timers);
        zrem.arg(&timers);
        let (mut adds, mut rems) = (0, 0);
        for (k, doc, deadline) in chunk {
            hset.arg(k).arg(doc);
            match deadline {
                Some(d) => {
                    zadd.arg(*d).arg(k);
                    adds += 1;
                }
                None => {
                    zrem.arg(k);
                    rems += 1;
                }
            }
        }
        pipe.add_command(hset).ignore();
        if adds > 0 {
            pipe.add_command(zadd).ignore();
        }
        if rems > 0 {
            pipe.add_command(zrem).ignore();
        }
    }
    let meta = serde_json::to_string(&w.meta).expect("meta serialises");
    pipe.cmd("SET").arg(format!("{b}:meta")).arg(meta);
    // EXEC answers nil when the watched epoch changed in between.
    let done: Option<(redis::Value,)> = pipe.query_async(conn).await?;
    match done {
        Some(_) => Ok(()),
        None => Err(CheckpointError::Fenced(format!("{topic}/{partition}"), epoch, -1)),
    }
}
