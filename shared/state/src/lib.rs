//! Cepheid's shared state.
//!
//! - [`rules`]: the rule store — the latest version of every rule plus its
//!   history, with an atomic "newer version only" check, and a change feed
//!   (Redis pub/sub) that services follow, resyncing fully on start and on
//!   every reconnect because pub/sub drops messages while disconnected.

pub mod rules;

/// How long a Redis command of a service may take to be answered before it
/// counts as failed, unless the service configures its own. Not the `redis`
/// crate's 500 ms: a Redis sharing busy cores with shards and a broker
/// answered after more than a second, and a command that times out may still
/// have been carried out (a rule change reported failed, a delivered-ids
/// lookup taken as "not delivered", a checkpoint written again whole).
pub const RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection that reconnects by itself after Redis restarts or the
/// network drops, its commands failing when not answered within `timeout`.
pub async fn connection_manager(client: &redis::Client, timeout: std::time::Duration) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
    let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(Some(timeout));
    client.get_connection_manager_with_config(config).await
}

/// Errors of the state layer, classified by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Redis unreachable or failing: retry with backoff.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The rule was refused (invalid, or not a newer version): the caller's fault.
    #[error("{0}")]
    Refused(String),
    #[error("rule `{0}` does not exist")]
    NotFound(String),
    /// Stored data that does not parse: someone wrote it by hand, or a bug.
    #[error("corrupt stored data for {what}: {msg}")]
    Corrupt { what: String, msg: String },
}

impl StateError {
    /// Worth retrying (transient infrastructure failure)?
    pub fn is_transient(&self) -> bool {
        matches!(self, StateError::Redis(e) if redis_unavailable(e))
    }
}

/// Is this Redis failure one that passes (Redis restarting, network down)?
pub fn redis_unavailable(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_connection_refusal()
        // LOADING (a restarted Redis reading its data back), TRYAGAIN, MASTERDOWN.
        || matches!(e.retry_method(), redis::RetryMethod::WaitAndRetry)
}

/// The waits between retries of something that depends on Redis (or another
/// service coming back): 100 ms, doubling up to 5 s.
#[derive(Debug)]
pub struct Backoff(std::time::Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(std::time::Duration::from_millis(100))
    }
}

impl Backoff {
    /// How long to wait before the next attempt.
    pub fn next_wait(&mut self) -> std::time::Duration {
        let w = self.0;
        self.0 = (w * 2).min(std::time::Duration::from_secs(5));
        w
    }
}

/// Runs `op` until it succeeds or fails for a reason other than Redis being
/// unreachable; transient failures are logged (`what`) and retried after a
/// backoff of 100 ms doubling up to 5 s. For what a service cannot go on
/// without (rules, checkpoints): it waits for Redis rather than exiting.
pub async fn retrying<T, F, Fut>(what: &str, mut op: F) -> Result<T, StateError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StateError>>,
{
    let mut backoff = Backoff::default();
    loop {
        match op().await {
            Err(e) if e.is_transient() => {
                let wait = backoff.next_wait();
                tracing::warn!("{what}: {e}; retrying in {} ms", wait.as_millis());
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

/// Deletes every key under `prefix:` (SCAN, not KEYS, so it is safe on a busy
/// server). For tear-down: tests, or removing a whole Cepheid installation.
pub async fn delete_prefix(url: &str, prefix: &str) -> Result<u64, StateError> {
    let client = redis::Client::open(url)?;
    let mut con = connection_manager(&client, RESPONSE_TIMEOUT).await?;
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(format!("{prefix}:*")).arg("COUNT").arg(500).query_async(&mut con).await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("DEL").arg(keys).query_async(&mut con).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}
