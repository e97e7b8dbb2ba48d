//! Cepheid's reach layer: what happens after a rule fires.
//!
//! A match record and its rule's `action` come in; the [`Notifier`] drops
//! duplicates (by `match_id`, and per rule and key within `dedupe`), holds
//! delayed alerts (durably in Redis, or in memory for the embedded pipeline),
//! looks up enrichment data (cached, never blocking on a slow source), renders
//! the template, and hands one job per target to that target's own worker. A
//! worker keeps the target's rate limits, retries failures that are worth
//! retrying with exponential backoff and jitter, and after the last attempt
//! writes the alert to the dead-letter output with the error — a slow or
//! failing target never stalls the others.
//!
//! Time comes from an injected [`cepheid_types::Clock`] and waiting from a
//! [`Sleeper`], so tests drive both.

pub mod config;
pub mod delivery;
pub mod enrich;
pub mod sign;
pub mod stores;
pub mod targets;
pub mod template;

pub use config::{NotifierConfig, TargetConfig};
pub use delivery::{Metrics, Notifier, NotifierDeps, Sleeper, Submitted, TargetMetrics, TokioSleeper};

/// Errors of the notifier.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("rule targets `{0}`, which is not configured (configure it under [notifier.targets.<name>])")]
    UnknownTarget(String),
    #[error("target `{target}` is configured as {configured}, but the rule names it as {named}")]
    KindMismatch { target: String, configured: String, named: String },
    #[error("template: {0}")]
    Template(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("dead-letter output: {0}")]
    Io(#[from] std::io::Error),
}

impl NotifyError {
    /// Redis unreachable for now (restarting, network): worth retrying.
    pub fn is_transient(&self) -> bool {
        matches!(self, NotifyError::Redis(e) if cepheid_state::redis_unavailable(e))
    }
}
