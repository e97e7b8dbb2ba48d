//! `cepheid-matcher-shard [CONFIG]`: configuration, connections, signals; the work is in [`cepheid_matcher_shard::run`].

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use anyhow::Context;
use cepheid_runtime::{config_arg, load, shutdown_signal, KafkaSettings, RedisSettings};
use serde::Deserialize;

#[derive(Deserialize)]
struct Settings {
    #[serde(default)]
    shard: cepheid_matcher_shard::ShardConfig,
    engine: cepheid_engine::engine::EngineConfig,
    redis: RedisSettings,
    kafka: KafkaSettings,
    #[serde(default)]
    telemetry: cepheid_telemetry::TelemetrySettings,
}

fn main() -> anyhow::Result<()> {
    let cfg: Settings = load(config_arg().as_deref())?;
    let rt = match cfg.shard.threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
    };
    // On a worker (not the main thread), so that the loop and the actors it
    // wakes share the runtime's threads.
    rt.block_on(async move { tokio::spawn(serve(cfg)).await? })
}

async fn serve(cfg: Settings) -> anyhow::Result<()> {
    let telemetry = cepheid_telemetry::init("cepheid-matcher-shard", &cfg.telemetry)?;
    let bus = cfg.kafka.bus()?;
    let rules = cepheid_state::rules::RedisRuleStore::connect(&cfg.redis.url, &cfg.redis.prefix).await?;
    let http = tokio::net::TcpListener::bind(&cfg.shard.listen).await.with_context(|| format!("binding {}", cfg.shard.listen))?;
    let deps = cepheid_matcher_shard::Deps {
        bus,
        rules,
        redis_url: cfg.redis.url.clone(),
        prefix: cfg.redis.prefix.clone(),
        clock: Arc::new(cepheid_types::SystemClock),
        telemetry,
    };
    let report = cepheid_matcher_shard::run(cfg.shard, cfg.engine, deps, Some(http), shutdown_signal()).await?;
    tracing::info!("cepheid-matcher-shard stopped: {report:?}");
    Ok(())
}
