//! The `cepheid` command's view of the layered configuration (see
//! [`cepheid_runtime::load`]): its own sections, and the services' sections
//! accepted so that one file configures everything.

use std::path::Path;

use cepheid_engine::engine::EngineConfig;
pub use cepheid_runtime::RedisSettings;
use serde::Deserialize;

/// The compiled-in defaults.
pub const DEFAULTS: &str = cepheid_runtime::DEFAULTS;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub engine: EngineConfig,
    pub run: RunSettings,
    pub redis: RedisSettings,
    #[serde(default)]
    pub notifier: cepheid_notify::NotifierConfig,
    /// Kafka, for `kafka:` alert targets of `cepheid run --notify` (and the services).
    #[serde(default)]
    pub kafka: Option<cepheid_runtime::KafkaSettings>,
    /// Sections of the services (read by them, accepted here).
    #[serde(default)]
    pub notifier_service: Option<serde_json::Value>,
    #[serde(default)]
    pub ingest: Option<serde_json::Value>,
    #[serde(default)]
    pub router: Option<serde_json::Value>,
    /// The matcher shard's section (read by `cepheid-matcher-shard`).
    #[serde(default)]
    pub shard: Option<serde_json::Value>,
    /// Traces and logs of the services.
    #[serde(default)]
    pub telemetry: cepheid_telemetry::TelemetrySettings,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    pub source: String,
    pub rules_poll_ms: u64,
    pub progress_interval_ms: u64,
}

impl Settings {
    /// Loads the layers; `file` is optional.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Settings> {
        cepheid_runtime::load(file)
    }
}
