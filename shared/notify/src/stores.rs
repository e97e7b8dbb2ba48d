//! Where the notifier remembers things: delivered match ids and rule dedupe
//! windows, and delayed alerts — in memory (embedded pipeline) or in Redis
//! (the service: survives restarts, shared by replicas).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cepheid_types::Clock;
use redis::aio::ConnectionManager;

use crate::NotifyError;

/// Memory or Redis.
#[derive(Clone)]
pub enum Store {
    Memory(Arc<MemoryStore>),
    /// The connection reconnects by itself after Redis restarts.
    Redis { con: ConnectionManager, prefix: String },
}

#[derive(Default)]
pub struct MemoryStore {
    keys: Mutex<HashMap<String, i64>>,
    /// Keys set once, with the owner that set them.
    owned: Mutex<HashMap<String, (i64, String)>>,
    delayed: Mutex<BTreeMap<(i64, u64), String>>,
    seq: Mutex<u64>,
}

impl Store {
    pub fn memory() -> Store {
        Store::Memory(Arc::new(MemoryStore::default()))
    }

    /// Commands not answered within [`cepheid_state::RESPONSE_TIMEOUT`] fail
    /// (with the `redis` crate's 500 ms, a delivered-ids lookup that timed out
    /// on a busy Redis counted as "not delivered": an alert twice). Redis down
    /// fails at once all the same.
    pub async fn redis(url: &str, prefix: &str) -> Result<Store, NotifyError> {
        let client = redis::Client::open(url)?;
        Ok(Store::Redis { con: cepheid_state::connection_manager(&client, cepheid_state::RESPONSE_TIMEOUT).await?, prefix: prefix.to_string() })
    }

    /// Sets `key` for `ttl_ms`, held by `owner` (e.g. a match id), unless it
    /// is set: true the first time, and again for the same owner (a retry
    /// whose first attempt was carried out but not answered must not find
    /// the key "taken" by itself), false for anyone else.
    pub async fn set_once(&self, key: &str, owner: &str, ttl_ms: u64, clock: &dyn Clock) -> Result<bool, NotifyError> {
        match self {
            Store::Memory(m) => {
                let now = clock.now();
                let mut keys = m.owned.lock().unwrap();
                if keys.len() > 100_000 {
                    keys.retain(|_, (exp, _)| *exp > now);
                }
                match keys.get(key) {
                    Some((exp, held)) if *exp > now => Ok(held == owner),
                    _ => {
                        keys.insert(key.to_string(), (now + ttl_ms as i64, owner.to_string()));
                        Ok(true)
                    }
                }
            }
            Store::Redis { con, prefix } => {
                // `GET` returns what was there: nothing (set now) or the owner
                // that set it, which is this caller again when a first attempt
                // was carried out but its answer lost (a timeout, a dropped
                // connection) — then the window is still this caller's.
                let before: Option<String> = redis::cmd("SET")
                    .arg(format!("{prefix}:notify:{key}"))
                    .arg(owner)
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(ttl_ms.max(1))
                    .query_async(&mut con.clone())
                    .await?;
                Ok(before.is_none_or(|b| b == owner))
            }
        }
    }

    /// Which of `keys` are set, in one round trip.
    pub async fn which_set(&self, keys: &[String], clock: &dyn Clock) -> Result<Vec<bool>, NotifyError> {
        match self {
            Store::Memory(m) => {
                let now = clock.now();
                let set = m.keys.lock().unwrap();
                Ok(keys.iter().map(|k| set.get(k).is_some_and(|exp| *exp > now)).collect())
            }
            Store::Redis { con, prefix } => {
                let mut pipe = redis::pipe();
                for k in keys {
                    pipe.cmd("EXISTS").arg(format!("{prefix}:notify:{k}"));
                }
                let n: Vec<i64> = pipe.query_async(&mut con.clone()).await?;
                Ok(n.into_iter().map(|n| n > 0).collect())
            }
        }
    }

    /// Sets every key of `keys` for `ttl_ms`, in one round trip.
    pub async fn set_all(&self, keys: &[String], ttl_ms: u64, clock: &dyn Clock) -> Result<(), NotifyError> {
        if keys.is_empty() {
            return Ok(());
        }
        match self {
            Store::Memory(m) => {
                let exp = clock.now() + ttl_ms as i64;
                let mut set = m.keys.lock().unwrap();
                for k in keys {
                    set.insert(k.clone(), exp);
                }
                Ok(())
            }
            Store::Redis { con, prefix } => {
                let mut pipe = redis::pipe();
                for k in keys {
                    pipe.cmd("SET").arg(format!("{prefix}:notify:{k}")).arg(1).arg("PX").arg(ttl_ms.max(1)).ignore();
                }
                let () = pipe.query_async(&mut con.clone()).await?;
                Ok(())
            }
        }
    }

    /// Holds an item until `due` (ms).
    pub async fn delay(&self, due: i64, item: String) -> Result<(), NotifyError> {
        match self {
            Store::Memory(m) => {
                let mut seq = m.seq.lock().unwrap();
                *seq += 1;
                m.delayed.lock().unwrap().insert((due, *seq), item);
                Ok(())
            }
            Store::Redis { con, prefix } => {
                let _: i64 = redis::cmd("ZADD").arg(format!("{prefix}:notify:delayed")).arg(due).arg(item).query_async(&mut con.clone()).await?;
                Ok(())
            }
        }
    }

    /// Takes the items due at `now` (each is handed to exactly one caller).
    pub async fn take_due(&self, now: i64) -> Result<Vec<String>, NotifyError> {
        match self {
            Store::Memory(m) => {
                let mut d = m.delayed.lock().unwrap();
                let later = d.split_off(&(now + 1, 0));
                let due = std::mem::replace(&mut *d, later);
                Ok(due.into_values().collect())
            }
            Store::Redis { con, prefix } => {
                let key = format!("{prefix}:notify:delayed");
                let items: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(500)
                    .query_async(&mut con.clone())
                    .await?;
                let mut mine = Vec::new();
                for it in items {
                    let removed: i64 = redis::cmd("ZREM").arg(&key).arg(&it).query_async(&mut con.clone()).await?;
                    if removed == 1 {
                        mine.push(it);
                    }
                }
                Ok(mine)
            }
        }
    }

    /// Number of delayed items waiting.
    pub async fn delayed_len(&self) -> Result<usize, NotifyError> {
        match self {
            Store::Memory(m) => Ok(m.delayed.lock().unwrap().len()),
            Store::Redis { con, prefix } => {
                let n: usize = redis::cmd("ZCARD").arg(format!("{prefix}:notify:delayed")).query_async(&mut con.clone()).await?;
                Ok(n)
            }
        }
    }
}
