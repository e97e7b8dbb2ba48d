//! `cepheid-ingest [CONFIG]`: configuration, connections, signals; the work is in [`cepheid_ingest::run`].

use anyhow::Context;
use cepheid_runtime::{config_arg, load, shutdown_signal, KafkaSettings};
use serde::Deserialize;

#[derive(Deserialize)]
struct Settings {
    #[serde(default)]
    ingest: cepheid_ingest::IngestConfig,
    kafka: KafkaSettings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg: Settings = load(config_arg().as_deref())?;
    let bus = cfg.kafka.bus()?;
    let listener = tokio::net::TcpListener::bind(&cfg.ingest.listen).await.with_context(|| format!("binding {}", cfg.ingest.listen))?;
    eprintln!("cepheid-ingest: POST http://{}/v1/events?source=NAME", listener.local_addr()?);
    cepheid_ingest::run(cfg.ingest, bus, listener, shutdown_signal()).await
}
