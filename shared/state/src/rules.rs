//! The rule store in Redis.
//!
//! Keys (prefix `cepheid` by default):
//! - `{p}:rules` — hash: id → the latest rule document (JSON), live rules only;
//! - `{p}:rules:versions` — hash: id → the highest version ever stored (kept
//!   after a delete, so a re-created rule must carry a higher version);
//! - `{p}:rule:{id}:history` — hash: version → document;
//! - `{p}:rules:seq` — counter of changes;
//! - channel `{p}:rules:changes` — one JSON message per change.

use cepheid_rules::{parse_rule_value, RuleSpec};
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::StateError;

/// The change feed: ends when the subscription's connection drops.
pub type RuleFeed = std::pin::Pin<Box<dyn futures_util::Stream<Item = RuleChange> + Send>>;

/// What [`RedisRuleStore::watch`] reports.
#[derive(Clone, Debug)]
pub enum RuleUpdate {
    /// Every live rule: anything held that is not in it is gone.
    All(Vec<RuleSpec>),
    /// A rule stored or replaced (its latest version).
    Upsert(Box<RuleSpec>),
    /// A rule deleted.
    Delete(String),
}

impl RuleUpdate {
    /// Of the rule ids a service holds, those a full resync (`all`) no longer has.
    pub fn gone<'a>(all: &[RuleSpec], held: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let keep: std::collections::HashSet<&str> = all.iter().map(|r| r.id.as_str()).collect();
        held.into_iter().filter(|id| !keep.contains(id)).map(str::to_string).collect()
    }
}

/// One change, as published on the change channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleChange {
    pub seq: u64,
    pub op: ChangeOp,
    pub id: String,
    pub version: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    Upsert,
    Delete,
}

/// Rules in Redis.
#[derive(Clone)]
pub struct RedisRuleStore {
    client: redis::Client,
    /// Reconnects by itself after Redis restarts (requests fail meanwhile).
    con: ConnectionManager,
    prefix: String,
}

const APPLY: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cur) >= tonumber(ARGV[2]) then
  return {0, tonumber(cur)}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
local seq = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[4], cjson.encode({seq = seq, op = 'upsert', id = ARGV[1], version = tonumber(ARGV[2])}))
return {1, seq}
"#;

const DELETE: &str = r#"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  return {0, 0}
end
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
redis.call('HDEL', KEYS[2], ARGV[1])
local seq = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[2], cjson.encode({seq = seq, op = 'delete', id = ARGV[1], version = v}))
return {1, seq}
"#;

impl RedisRuleStore {
    /// Connects; a command not answered within [`crate::RESPONSE_TIMEOUT`]
    /// fails (with the `redis` crate's 500 ms, `cepheid rules apply` against a
    /// busy Redis reported changes as failed that were carried out).
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisRuleStore, StateError> {
        let client = redis::Client::open(url)?;
        let con = crate::connection_manager(&client, crate::RESPONSE_TIMEOUT).await?;
        Ok(RedisRuleStore { client, con, prefix: prefix.to_string() })
    }

    fn k(&self, s: &str) -> String {
        format!("{}:{s}", self.prefix)
    }

    pub fn channel(&self) -> String {
        self.k("rules:changes")
    }

    /// Stores a rule if its version is newer than any stored for its id.
    /// The caller validates first (nothing invalid is ever stored).
    pub async fn apply(&self, spec: &RuleSpec) -> Result<u64, StateError> {
        let doc = serde_json::to_string(&spec.document).map_err(|e| StateError::Refused(e.to_string()))?;
        let (ok, n): (i64, i64) = redis::Script::new(APPLY)
            .key(self.k("rules:versions"))
            .key(self.k("rules"))
            .key(self.k(&format!("rule:{}:history", spec.id)))
            .key(self.k("rules:seq"))
            .arg(&spec.id)
            .arg(spec.version)
            .arg(doc)
            .arg(self.channel())
            .invoke_async(&mut self.con.clone())
            .await?;
        if ok == 1 {
            Ok(n as u64)
        } else {
            Err(StateError::Refused(format!(
                "rule `{}`: version {} is not newer than the stored version {n}; a change needs a higher version",
                spec.id, spec.version
            )))
        }
    }

    /// Removes a rule (its history stays; its version number stays taken).
    pub async fn delete(&self, id: &str) -> Result<u64, StateError> {
        let (ok, seq): (i64, i64) = redis::Script::new(DELETE)
            .key(self.k("rules:versions"))
            .key(self.k("rules"))
            .key(self.k("rules:seq"))
            .arg(id)
            .arg(self.channel())
            .invoke_async(&mut self.con.clone())
            .await?;
        if ok == 1 {
            Ok(seq as u64)
        } else {
            Err(StateError::NotFound(id.to_string()))
        }
    }

    /// Disables a rule by storing its next version with `enabled: false`.
    pub async fn disable(&self, id: &str) -> Result<RuleSpec, StateError> {
        let cur = self.get(id).await?.ok_or_else(|| StateError::NotFound(id.to_string()))?;
        let mut doc = cur.document.clone();
        doc["enabled"] = serde_json::Value::Bool(false);
        doc["version"] = serde_json::Value::from(cur.version + 1);
        let spec = parse_rule_value(&doc).map_err(|d| StateError::Refused(d.to_string()))?;
        self.apply(&spec).await?;
        Ok(spec)
    }

    /// The latest version of a rule.
    pub async fn get(&self, id: &str) -> Result<Option<RuleSpec>, StateError> {
        let doc: Option<String> = redis::cmd("HGET").arg(self.k("rules")).arg(id).query_async(&mut self.con.clone()).await?;
        doc.map(|d| parse_stored(id, &d)).transpose()
    }

    /// A given version of a rule, from its history.
    pub async fn get_version(&self, id: &str, version: u64) -> Result<Option<RuleSpec>, StateError> {
        let doc: Option<String> = redis::cmd("HGET")
            .arg(self.k(&format!("rule:{id}:history")))
            .arg(version)
            .query_async(&mut self.con.clone())
            .await?;
        doc.map(|d| parse_stored(id, &d)).transpose()
    }

    /// Versions kept in a rule's history, oldest first.
    pub async fn history(&self, id: &str) -> Result<Vec<u64>, StateError> {
        let vs: Vec<String> =
            redis::cmd("HKEYS").arg(self.k(&format!("rule:{id}:history"))).query_async(&mut self.con.clone()).await?;
        let mut v: Vec<u64> = vs.iter().filter_map(|s| s.parse().ok()).collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Every live rule (a full resync), sorted by id, and the change counter
    /// at the time of reading.
    pub async fn list(&self) -> Result<(Vec<RuleSpec>, u64), StateError> {
        let (all, seq): (Vec<(String, String)>, Option<u64>) = redis::pipe()
            .atomic()
            .cmd("HGETALL")
            .arg(self.k("rules"))
            .cmd("GET")
            .arg(self.k("rules:seq"))
            .query_async(&mut self.con.clone())
            .await?;
        let mut out = Vec::with_capacity(all.len());
        for (id, doc) in all {
            out.push(parse_stored(&id, &doc)?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((out, seq.unwrap_or(0)))
    }

    /// A full resync: subscribes to the change channel, then lists every rule
    /// (a change between the two is seen twice, never missed). While Redis is
    /// unreachable it retries with backoff, so a service rides out a Redis
    /// restart instead of exiting; other errors (a corrupt stored rule) return.
    pub async fn resync(&self, who: &str) -> Result<(Vec<RuleSpec>, RuleFeed), StateError> {
        crate::retrying(&format!("{who}: rule resync"), || async {
            let feed: RuleFeed = Box::pin(self.subscribe().await?);
            let (all, _) = self.list().await?;
            Ok((all, feed))
        })
        .await
    }

    /// Follows the store in a background task: first every rule
    /// ([`RuleUpdate::All`]), then each change as it is published, and again
    /// every rule after each reconnect (pub/sub loses what is published while
    /// disconnected). While Redis is down the task waits and retries, and the
    /// service goes on with the rules it has. The channel ends with an error
    /// only for what retrying cannot mend (a corrupt stored rule).
    pub fn watch(&self, who: &str) -> tokio::sync::mpsc::Receiver<Result<RuleUpdate, StateError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (store, who) = (self.clone(), who.to_string());
        tokio::spawn(async move {
            let r: Result<(), StateError> = async {
                loop {
                    let (all, mut feed) = store.resync(&who).await?;
                    if tx.send(Ok(RuleUpdate::All(all))).await.is_err() {
                        return Ok(());
                    }
                    while let Some(c) = feed.next().await {
                        let update = match c.op {
                            ChangeOp::Upsert => match crate::retrying(&format!("{who}: reading rule `{}`", c.id), || store.get(&c.id)).await? {
                                Some(spec) => RuleUpdate::Upsert(Box::new(spec)),
                                None => continue, // deleted since; its delete follows
                            },
                            ChangeOp::Delete => RuleUpdate::Delete(c.id),
                        };
                        if tx.send(Ok(update)).await.is_err() {
                            return Ok(());
                        }
                    }
                    tracing::warn!("{who}: rule change feed lost (Redis connection dropped); resyncing");
                }
            }
            .await;
            if let Err(e) = r {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    /// Follows the change channel. The stream ends when the connection drops:
    /// the caller then resyncs with [`RedisRuleStore::list`] and subscribes again.
    pub async fn subscribe(&self) -> Result<impl futures_util::Stream<Item = RuleChange> + Send + use<>, StateError> {
        let mut ps = self.client.get_async_pubsub().await?;
        ps.subscribe(self.channel()).await?;
        Ok(ps.into_on_message().filter_map(|m| async move {
            let payload: String = m.get_payload().ok()?;
            serde_json::from_str::<RuleChange>(&payload).ok()
        }))
    }
}

fn parse_stored(id: &str, doc: &str) -> Result<RuleSpec, StateError> {
    let v: serde_json::Value =
        serde_json::from_str(doc).map_err(|e| StateError::Corrupt { what: format!("rule `{id}`"), msg: e.to_string() })?;
    parse_rule_value(&v).map_err(|d| StateError::Corrupt { what: format!("rule `{id}`"), msg: d.to_string() })
}
