//! One hop of the bus, measured alone: how long a record takes from the
//! producer to a consumer group member, on the configured broker, with the
//! services' client settings (`fetch.wait.max.ms` 10 unless `--fetch-wait-ms`
//! says otherwise). A record crosses three such hops between ingest's
//! acknowledgement and the notifier (events → keyed → matches), so three
//! times this is the floor under the cluster's latency beyond the lateness.
//!
//! Records are sent one at a time, each after the previous one arrived and a
//! random pause (so they land at any point of the consumer's fetch cycle).
//!
//! With `--backlog N` the partition first gets N batches of one record each
//! (each sent after the previous one was acknowledged): how a hop's latency
//! depends on what the partition already holds (tansu's memory storage lists
//! a partition's stored batches at every fetch that finds new data there).
//!
//! `cargo run --release -p cepheid-loadtest --bin hop -- --records 500`

use std::time::{Duration, Instant};

use cepheid_bus::{Bus, KafkaConfig};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[arg(long, default_value_t = 500)]
    records: usize,
    /// librdkafka's fetch.wait.max.ms for the consumer.
    #[arg(long, default_value_t = 10)]
    fetch_wait_ms: u64,
    /// librdkafka's linger.ms for the producer.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Batches stored in the partition before the measured records.
    #[arg(long, default_value_t = 0)]
    backlog: usize,
    /// Also append a JSON line with the results to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let properties = vec![("fetch.wait.max.ms".to_string(), a.fetch_wait_ms.to_string()), ("linger.ms".to_string(), a.linger_ms.to_string())];
    let bus = Bus::kafka(&KafkaConfig { bootstrap: a.bootstrap.clone(), properties })?;
    let topic = format!("cepheid-hop-{}", std::process::id());
    bus.create_topic(&topic, 1).await?;
    for i in 0..a.backlog {
        bus.send(&topic, Some(0), None, format!("backlog {i}").as_bytes(), &[]).await?;
    }
    let mut consumer = bus.subscribe(&format!("{topic}-group"), &[&topic])?;
    // Until the member has its partition (and has read the backlog), records would wait.
    bus.send(&topic, Some(0), None, b"warm-up", &[]).await?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(600), consumer.recv()).await.map_err(|_| anyhow::anyhow!("the warm-up record not received within 600 s"))??;
        if m.payload == b"warm-up" {
            break;
        }
    }
    let mut seed = 0x9E3779B97F4A7C15u64 ^ std::process::id() as u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut took = Vec::with_capacity(a.records);
    for i in 0..a.records {
        tokio::time::sleep(Duration::from_micros(5_000 + next() % 20_000)).await;
        let payload = i.to_string();
        let sent = Instant::now();
        let ack = bus.enqueue(&topic, Some(0), None, payload.as_bytes(), &[]).await?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.map_err(|_| anyhow::anyhow!("record {i} not received within 30 s"))??;
            if m.payload == payload.as_bytes() {
                break;
            }
        }
        took.push(sent.elapsed().as_secs_f64() * 1e3);
        ack.await?;
    }
    took.sort_by(f64::total_cmp);
    let out = serde_json::json!({
        "bench": "hop",
        "records": a.records,
        "backlog": a.backlog,
        "fetch_wait_ms": a.fetch_wait_ms,
        "linger_ms": a.linger_ms,
        "hop_ms": {"p50": percentile(&took, 0.5), "p95": percentile(&took, 0.95), "p99": percentile(&took, 0.99), "min": took[0], "max": took[took.len() - 1]},
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    if let Some(p) = a.json {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(p)?;
        writeln!(f, "{out}")?;
    }
    Ok(())
}
