//! What every Cepheid process shares at startup.
//!
//! Configuration is layered: the compiled-in `config/default.toml`, then an
//! optional file, then `CEPHEID__SECTION__KEY` environment variables; unknown
//! keys in a section are errors (each section's type denies them), so a
//! misspelt setting never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use config::{Config, Environment, File, FileFormat};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The compiled-in defaults (the repository's `config/default.toml`).
pub const DEFAULTS: &str = include_str!("../../../config/default.toml");

/// Loads the layers into `T` (each process reads the sections it needs).
pub fn load<T: DeserializeOwned>(file: Option<&Path>) -> anyhow::Result<T> {
    let mut b = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
    if let Some(f) = file {
        anyhow::ensure!(f.exists(), "config file {} does not exist", f.display());
        b = b.add_source(File::from(f));
    }
    b = b.add_source(Environment::with_prefix("CEPHEID").prefix_separator("__").separator("__").try_parsing(true));
    b.build().context("reading configuration")?.try_deserialize().context("invalid configuration")
}

/// The `[kafka]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub bootstrap: String,
    /// Any librdkafka property (`security.protocol`, `sasl.mechanisms`, …).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka's `sasl.password`, kept out of files: set it with
    /// `CEPHEID__KAFKA__SASL_PASSWORD` (the Helm chart does, from a Secret).
    #[serde(default)]
    pub sasl_password: Option<String>,
}

impl KafkaSettings {
    pub fn bus(&self) -> anyhow::Result<cepheid_bus::Bus> {
        let mut properties: Vec<(String, String)> = self.properties.clone().into_iter().collect();
        if let Some(p) = &self.sasl_password {
            properties.push(("sasl.password".into(), p.clone()));
        }
        let cfg = cepheid_bus::KafkaConfig { bootstrap: self.bootstrap.clone(), properties };
        cepheid_bus::Bus::kafka(&cfg).with_context(|| format!("connecting to Kafka at {}", self.bootstrap))
    }
}

/// The `[redis]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: String,
    /// Every key Cepheid writes starts with this prefix.
    pub prefix: String,
}

/// Completes on SIGTERM (what Kubernetes sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The configuration file named on the command line, else by `CEPHEID_CONFIG`, if any.
pub fn config_arg() -> Option<std::path::PathBuf> {
    std::env::args_os().nth(1).or_else(|| std::env::var_os("CEPHEID_CONFIG").filter(|v| !v.is_empty())).map(Into::into)
}
