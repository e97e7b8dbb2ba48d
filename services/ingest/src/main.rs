//! `cepheid-ingest [CONFIG]`: configuration, connections, signals; the work is in [`cepheid_ingest::run`].

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use cepheid_runtime::{config_arg, load, shutdown_signal, KafkaSettings, RedisSettings};
use serde::Deserialize;

#[derive(Deserialize)]
struct Settings {
    #[serde(default)]
    ingest: cepheid_ingest::IngestConfig,
    kafka: KafkaSettings,
    redis: RedisSettings,
    #[serde(default)]
    telemetry: cepheid_telemetry::TelemetrySettings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg: Settings = load(config_arg().as_deref())?;
    let telemetry = cepheid_telemetry::init("cepheid-ingest", &cfg.telemetry)?;
    let bus = cfg.kafka.bus()?;
    let listener = tokio::net::TcpListener::bind(&cfg.ingest.listen).await.with_context(|| format!("binding {}", cfg.ingest.listen))?;
    tracing::info!("cepheid-ingest: POST http://{}/v1/events?source=NAME", listener.local_addr()?);
    // Connected on the first post carrying an `Idempotency-Key`: other posts never wait for Redis.
    let ledger = cepheid_ingest::ledger::PostLedger::redis(&cfg.redis.url, &cfg.redis.prefix, cfg.ingest.idempotency_ttl_ms, cfg.ingest.idempotency_lock_ms)?;
    cepheid_ingest::run(cfg.ingest, bus, telemetry, listener, ledger, shutdown_signal()).await
}
