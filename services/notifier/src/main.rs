//! `cepheid-notifier [CONFIG]`: configuration, connections, signals; the work is in [`cepheid_notifier::run`].

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use anyhow::Context;
use cepheid_runtime::{config_arg, load, shutdown_signal, KafkaSettings, RedisSettings};
use serde::Deserialize;

#[derive(Deserialize)]
struct Settings {
    #[serde(default)]
    notifier: cepheid_notify::NotifierConfig,
    #[serde(default)]
    notifier_service: cepheid_notifier::ServiceConfig,
    redis: RedisSettings,
    kafka: KafkaSettings,
    #[serde(default)]
    telemetry: cepheid_telemetry::TelemetrySettings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg: Settings = load(config_arg().as_deref())?;
    let telemetry = cepheid_telemetry::init("cepheid-notifier", &cfg.telemetry)?;
    let bus = cfg.kafka.bus()?;
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
        telemetry,
    };
    let report = cepheid_notifier::run(cfg.notifier_service, cfg.notifier, deps, shutdown_signal()).await?;
    tracing::info!("cepheid-notifier stopped: {} records, {} delivered to targets, {} skipped", report.records, report.submitted, report.skipped);
    Ok(())
}
