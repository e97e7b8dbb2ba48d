//! `cepheid-keygen-router`: configuration, connections, signals; the work is in [`cepheid_keygen_router::run`].

use anyhow::Context;
use cepheid_bus::{Bus, KafkaConfig};
use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

const DEFAULTS: &str = include_str!("../../../config/default.toml");

#[derive(Deserialize)]
struct Settings {
    #[serde(default)]
    router: cepheid_keygen_router::RouterConfig,
    engine: cepheid_engine::engine::EngineConfig,
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
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
    };
    let report = cepheid_keygen_router::run(cfg.router, cfg.engine, bus, rules, shutdown).await?;
    eprintln!("cepheid-keygen-router: {report:?}");
    Ok(())
}
