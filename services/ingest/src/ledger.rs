//! Posts sent again: what a post carrying an `Idempotency-Key` header got
//! stored, remembered in Redis, so that the same post sent again (its client
//! got no answer, or a `503` for some of its lines) stores only the lines
//! that did not get through, and a post still running under the key is not
//! run twice at once.
//!
//! Per key two Redis keys under one hash tag: the record
//! `{p}:ingest:post:{KEY}` (JSON: a digest of the post's source and body and
//! the line ranges stored so far; expires after `idempotency_ttl_ms`) and the
//! lock `{p}:ingest:post:{KEY}:lock` (held by the post running under the key,
//! renewed while it runs, expiring `idempotency_lock_ms` after its holder
//! stopped renewing it — a killed ingest holds no key for longer).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest key accepted (characters); Stripe's limit, and what fits a log line.
pub const MAX_KEY_LEN: usize = 255;

/// Why a key is refused as given.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!("`Idempotency-Key` must be 1 to {MAX_KEY_LEN} characters, got {}", key.len()));
    }
    if let Some(c) = key.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("`Idempotency-Key` may hold visible ASCII characters only, got {c:?}"));
    }
    Ok(())
}

/// What identifies a post's content: its source and its body.
pub fn digest(source: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update([0u8]);
    h.update(body.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Line numbers as sorted, disjoint, inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lines(Vec<(u64, u64)>);

impl Lines {
    pub fn contains(&self, line: u64) -> bool {
        let i = self.0.partition_point(|r| r.1 < line);
        self.0.get(i).is_some_and(|r| r.0 <= line)
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|r| r.1 - r.0 + 1).sum()
    }

    /// These lines and `more`.
    pub fn with(&self, more: impl IntoIterator<Item = u64>) -> Lines {
        let mut all: Vec<(u64, u64)> = self.0.clone();
        all.extend(more.into_iter().map(|l| (l, l)));
        all.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (a, b) in all {
            match out.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Lines(out)
    }
}

#[derive(Serialize, Deserialize)]
struct Record {
    digest: String,
    lines: Lines,
}

/// The outcome of asking for a key.
pub enum Begin {
    /// The key is this post's until [`PostLedger::finish`]; `stored` are the
    /// lines earlier posts under it got stored.
    Held(Held),
    /// Another post under the key is running.
    Busy,
    /// The key was used for a post with another source or body.
    OtherPost,
}

/// A key held by a running post.
pub struct Held {
    key: String,
    token: String,
    digest: String,
    pub stored: Lines,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("posts with an `Idempotency-Key` need Redis, and this ingest has none configured")]
    Disabled,
    #[error("redis (remembering posts by `Idempotency-Key`): {0}")]
    Redis(#[from] redis::RedisError),
    #[error("stored record of `Idempotency-Key` {key} does not parse: {msg}")]
    Corrupt { key: String, msg: String },
}

struct Inner {
    client: redis::Client,
    /// Connected on the first keyed post: posts without a key never need Redis.
    con: tokio::sync::OnceCell<ConnectionManager>,
    prefix: String,
    ttl_ms: u64,
    lock_ms: u64,
}

/// Renews a held key's lock until dropped (also when its post panicked).
pub struct Keeper(tokio::task::JoinHandle<()>);

impl Drop for Keeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where posts with an `Idempotency-Key` are remembered (cheap to clone).
#[derive(Clone)]
pub struct PostLedger(Option<std::sync::Arc<Inner>>);

static TOKENS: AtomicU64 = AtomicU64::new(0);

/// Sets the record, and gives the lock up if still held by this post (1) or
/// leaves it to whoever holds it now (0).
static FINISH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0",
    )
});

/// Renews the lock, if still held by this post.
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0",
    )
});

/// Gives the lock up, if still held by this post.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

impl PostLedger {
    /// No Redis: posts carrying a key are refused with a clear answer.
    pub fn disabled() -> PostLedger {
        PostLedger(None)
    }

    /// Remembers posts in the Redis at `url` (connected on the first keyed post).
    pub fn redis(url: &str, prefix: &str, ttl_ms: u64, lock_ms: u64) -> Result<PostLedger, LedgerError> {
        Ok(PostLedger(Some(std::sync::Arc::new(Inner {
            client: redis::Client::open(url)?,
            con: tokio::sync::OnceCell::new(),
            prefix: prefix.to_string(),
            ttl_ms: ttl_ms.max(1),
            lock_ms: lock_ms.max(3),
        }))))
    }

    fn inner(&self) -> Result<&Inner, LedgerError> {
        self.0.as_deref().ok_or(LedgerError::Disabled)
    }

    async fn con(&self) -> Result<ConnectionManager, LedgerError> {
        let inner = self.inner()?;
        let con = inner.con.get_or_try_init(|| cepheid_state::connection_manager(&inner.client, cepheid_state::RESPONSE_TIMEOUT)).await?;
        Ok(con.clone())
    }

    fn keys(&self, key: &str) -> Result<(String, String), LedgerError> {
        let p = &self.inner()?.prefix;
        let record = format!("{p}:ingest:post:{{{key}}}");
        Ok((format!("{record}:lock"), record))
    }

    /// Takes `key` for a post of `digest`, and reads what earlier posts under it stored.
    pub async fn begin(&self, key: &str, digest: String) -> Result<Begin, LedgerError> {
        let lock_ms = self.inner()?.lock_ms;
        let (lock, record) = self.keys(key)?;
        let token = format!("{}-{}", std::process::id(), TOKENS.fetch_add(1, Ordering::Relaxed));
        let mut con = self.con().await?;
        let (taken, stored): (Option<String>, Option<String>) =
            redis::pipe().cmd("SET").arg(&lock).arg(&token).arg("NX").arg("PX").arg(lock_ms).cmd("GET").arg(&record).query_async(&mut con).await?;
        if taken.is_none() {
            return Ok(Begin::Busy);
        }
        let held = Held { key: key.to_string(), token, digest, stored: Lines::default() };
        let Some(stored) = stored else { return Ok(Begin::Held(held)) };
        let r: Record = match serde_json::from_str(&stored) {
            Ok(r) => r,
            Err(e) => {
                self.release(&held).await;
                return Err(LedgerError::Corrupt { key: key.to_string(), msg: e.to_string() });
            }
        };
        if r.digest != held.digest {
            self.release(&held).await;
            return Ok(Begin::OtherPost);
        }
        Ok(Begin::Held(Held { stored: r.lines, ..held }))
    }

    /// Renews `held`'s lock every third of its time until the returned guard is dropped.
    pub fn keep(&self, held: &Held) -> Option<Keeper> {
        let inner = self.0.clone()?;
        let (lock, _) = self.keys(&held.key).ok()?;
        let token = held.token.clone();
        let ledger = self.clone();
        Some(Keeper(tokio::spawn(async move {
            let every = Duration::from_millis(inner.lock_ms / 3);
            loop {
                tokio::time::sleep(every).await;
                let renewed: Result<i64, LedgerError> = async {
                    let mut con = ledger.con().await?;
                    Ok(RENEW.key(&lock).arg(&token).arg(inner.lock_ms).invoke_async(&mut con).await?)
                }
                .await;
                match renewed {
                    Ok(1) => {}
                    Ok(_) => {
                        tracing::warn!("idempotency key lock {lock} was lost while its post ran (not renewed in time): a post sent again meanwhile may store lines twice");
                        return;
                    }
                    Err(e) => tracing::warn!("renewing idempotency key lock {lock}: {e}"),
                }
            }
        })))
    }

    /// Records that `held`'s post got `lines` stored (besides what earlier
    /// posts did) and gives the key up. Ok(false): the lock had expired
    /// meanwhile (Redis unreachable for longer than the lock's time).
    pub async fn finish(&self, held: &Held, lines: impl IntoIterator<Item = u64>) -> Result<bool, LedgerError> {
        let inner = self.inner()?;
        let (lock, record) = self.keys(&held.key)?;
        let r = Record { digest: held.digest.clone(), lines: held.stored.with(lines) };
        let text = serde_json::to_string(&r).expect("a record serialises");
        let mut con = self.con().await?;
        let kept: i64 = FINISH.key(&lock).key(&record).arg(&held.token).arg(text).arg(inner.ttl_ms).invoke_async(&mut con).await?;
        Ok(kept == 1)
    }

    /// Gives the key up without recording anything (best effort: it expires anyway).
    pub async fn release(&self, held: &Held) {
        let Ok((lock, _)) = self.keys(&held.key) else { return };
        let r: Result<i64, LedgerError> = async {
            let mut con = self.con().await?;
            Ok(RELEASE.key(&lock).arg(&held.token).invoke_async(&mut con).await?)
        }
        .await;
        if let Err(e) = r {
            tracing::warn!("giving up idempotency key lock {lock}: {e} (it expires by itself)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_merge_into_ranges() {
        let l = Lines::default().with([3, 1, 2, 7]);
        assert_eq!(l, Lines(vec![(1, 3), (7, 7)]));
        let l = l.with([5, 6, 4, 9]);
        assert_eq!(l, Lines(vec![(1, 7), (9, 9)]));
        assert_eq!(l.count(), 8);
        assert!(l.contains(1) && l.contains(4) && l.contains(7) && l.contains(9));
        assert!(!l.contains(0) && !l.contains(8) && !l.contains(10));
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("order-42/2026-12-07").is_ok());
        assert!(check_key("").unwrap_err().contains("1 to 255"));
        assert!(check_key(&"k".repeat(256)).unwrap_err().contains("got 256"));
        assert!(check_key("a b").unwrap_err().contains("visible ASCII"));
    }

    #[test]
    fn digests_tell_source_and_body_apart() {
        assert_eq!(digest("s", "body"), digest("s", "body"));
        assert_ne!(digest("s", "body"), digest("t", "body"));
        assert_ne!(digest("sb", "ody"), digest("s", "body"));
    }
}
