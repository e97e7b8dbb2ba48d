//! Layered configuration: compiled-in `config/default.toml`, an optional
//! file, then `CEPHEID__SECTION__KEY` environment variables.

use std::path::Path;

use anyhow::Context;
use cepheid_engine::engine::EngineConfig;
use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

/// The compiled-in defaults (the repository's `config/default.toml`).
pub const DEFAULTS: &str = include_str!("../../config/default.toml");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub engine: EngineConfig,
    pub run: RunSettings,
    pub redis: RedisSettings,
    #[serde(default)]
    pub notifier: cepheid_notify::NotifierConfig,
    /// Sections of the services (read by them, accepted here).
    #[serde(default)]
    pub kafka: Option<serde_json::Value>,
    #[serde(default)]
    pub notifier_service: Option<serde_json::Value>,
    #[serde(default)]
    pub ingest: Option<serde_json::Value>,
    #[serde(default)]
    pub router: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
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
        let mut b = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(f) = file {
            anyhow::ensure!(f.exists(), "config file {} does not exist", f.display());
            b = b.add_source(File::from(f));
        }
        b = b.add_source(Environment::with_prefix("CEPHEID").prefix_separator("__").separator("__").try_parsing(true));
        let cfg = b.build().context("reading configuration")?;
        cfg.try_deserialize().context("invalid configuration")
    }
}
