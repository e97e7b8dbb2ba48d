//! `cepheid-ingest [CONFIG]`: configuration, connections, signals; the work is in [`cepheid_ingest::run`].

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use cepheid_runtime::{config_arg, load, shutdown_signal, KafkaSettings};
use serde::Deserialize;

#[derive(Deserialize)]
struct Settings {
    #[serde(default)]
    ingest: cepheid_ingest::IngestConfig,
    kafka: KafkaSettings,
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
    cepheid_ingest::run(cfg.ingest, bus, telemetry, listener, shutdown_signal()).await
}
