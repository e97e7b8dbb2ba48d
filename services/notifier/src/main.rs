//! `cepheid-notifier`: configuration, connections, signals; the work is in [`cepheid_notifier::run`].

use std::sync::Arc;

use anyhow::Context;
use cepheid_bus::{Bus, KafkaConfig};
use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

const DEFAULTS: &str = include_str!("../../../config/default.toml");

#[derive(Deserialize)]
struct Settings {
    #[serde(default)]
    notifier: cepheid_notify::NotifierConfig,
    #[serde(default)]
    notifier_service: cepheid_notifier::ServiceConfig,
    redis: Redis,
    kafka: Kafka,
}

#[derive(Deserialize)]
struct Redis {
    url: String,
    prefix: String,
}

#[derive(Deserialize)]
struct Kafka {
    bootstrap: String,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut b = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
    if let Some(f) = std::env::args().nth(1) {
        b = b.add_source(File::with_name(&f));
    }
    let cfg: Settings = b
        .add_source(Environment::with_prefix("CEPHEID").prefix_separator("__").separator("__").try_parsing(true))
        .build()?
        .try_deserialize()
        .context("invalid configuration")?;
    let bus = Bus::kafka(&KafkaConfig { bootstrap: cfg.kafka.bootstrap, properties: cfg.kafka.properties.into_iter().collect() })?;
    let rules = cepheid_state::rules::RedisRuleStore::connect(&cfg.redis.url, &cfg.redis.prefix).await?;
    let store = cepheid_notify::stores::Store::redis(&cfg.redis.url, &cfg.redis.prefix).await?;
    let http = tokio::net::TcpListener::bind(&cfg.notifier_service.listen).await.with_context(|| format!("binding {}", cfg.notifier_service.listen))?;
    let deps = cepheid_notifier::Deps {
        bus,
        rules,
        store,
        clock: Arc::new(cepheid_types::SystemClock),
        sleeper: Arc::new(cepheid_notify::TokioSleeper),
        http: Some(http),
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
    };
    let report = cepheid_notifier::run(cfg.notifier_service, cfg.notifier, deps, shutdown).await?;
    eprintln!("cepheid-notifier: {} records, {} delivered to targets, {} skipped", report.records, report.submitted, report.skipped);
    Ok(())
}
