//! `cepheid-keygen-router [CONFIG]`: configuration, connections, signals; the work is in [`cepheid_keygen_router::run`].

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use cepheid_runtime::{config_arg, load, shutdown_signal, KafkaSettings, RedisSettings};
use serde::Deserialize;

#[derive(Deserialize)]
struct Settings {
    #[serde(default)]
    router: cepheid_keygen_router::RouterConfig,
    engine: cepheid_engine::engine::EngineConfig,
    redis: RedisSettings,
    kafka: KafkaSettings,
    #[serde(default)]
    telemetry: cepheid_telemetry::TelemetrySettings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg: Settings = load(config_arg().as_deref())?;
    let telemetry = cepheid_telemetry::init("cepheid-keygen-router", &cfg.telemetry)?;
    let bus = cfg.kafka.bus()?;
    let rules = cepheid_state::rules::RedisRuleStore::connect(&cfg.redis.url, &cfg.redis.prefix).await?;
    let http = tokio::net::TcpListener::bind(&cfg.router.listen).await.with_context(|| format!("binding {}", cfg.router.listen))?;
    let report = cepheid_keygen_router::run(cfg.router, cfg.engine, bus, rules, telemetry, Some(http), shutdown_signal()).await?;
    tracing::info!("cepheid-keygen-router stopped: {report:?}");
    Ok(())
}
