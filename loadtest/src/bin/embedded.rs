//! Load driver for the embedded engine: generates a clickstream in memory,
//! then decodes and matches it on one thread, and reports events/s and state
//! size. With `--rate`, events are fed at that pace (event time advancing
//! with the clock) and the report adds event-to-match latency, p50/p95/p99:
//! from the moment a match's last event was due until the match came out
//! (which includes waiting for the watermark: the 2 s bound). Resident memory
//! is reported either way. `cargo run --release -p cepheid-loadtest --bin embedded -- --help`

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use cepheid_engine::engine::{Engine, EngineConfig, ManualClock, Output};
use cepheid_loadtest::clickstream::{generate, Params};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Events to generate and match.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    #[arg(long, default_value_t = 5_000)]
    products: usize,
    /// Rule files or directories of them to load (default: the five e-commerce example rules).
    #[arg(long)]
    rules: Vec<PathBuf>,
    /// Repeat the measurement this many times and report the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Feed events at this many per second (0: as fast as they match); paced runs report latency.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Also write a JSON line with the results to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let rules: Vec<PathBuf> = if a.rules.is_empty() {
        ["cross_sell.json", "cart_abandon_high_value.json", "high_intent.yaml", "price_sensitive.json", "churn_risk.json"]
            .iter()
            .map(|f| root.join("rules/examples").join(f))
            .collect()
    } else {
        a.rules.clone()
    };
    let specs = cepheid_loadtest::examples::load_rules(&rules)?;
    let t0 = Instant::now();
    let paced = a.rate > 0.0;
    let params = Params { events: a.events, users: a.users, products: a.products, ..Params::default() };
    let params = if paced { Params { rate: a.rate, ..params } } else { params };
    let lines = generate(&params);
    eprintln!("generated {} events in {:.1} s", lines.len(), t0.elapsed().as_secs_f64());

    let mut rates = Vec::new();
    let mut last = (0, 0, 0, 0);
    let mut lat: Vec<f64> = Vec::new();
    for _ in 0..a.runs.max(1) {
        let mut engine = Engine::new(EngineConfig::default(), Arc::new(ManualClock::new(0)));
        for s in &specs {
            engine.upsert_rule(s)?;
        }
        let mut out = Vec::new();
        let mut matches = 0u64;
        let mut peak = (0usize, 0usize);
        let start = Instant::now();
        // Paced: when each event time was first due.
        let mut due_at: HashMap<i64, Instant> = HashMap::new();
        lat.clear();
        for (i, l) in lines.iter().enumerate() {
            let e = engine.decode_owned("clickstream", l.clone())?;
            if paced {
                let due = start + Duration::from_secs_f64(i as f64 / a.rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                due_at.entry(e.time()).or_insert(due);
            }
            engine.push("clickstream", e, &mut out);
            for o in &out {
                if let Output::Match(m) = o {
                    matches += 1;
                    if let Some(d) = due_at.get(&m.last_event_time) {
                        lat.push(d.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
            out.clear();
            if i % 100_000 == 0 {
                let s = engine.state_size();
                if s.0 > peak.0 {
                    peak = s;
                }
            }
        }
        engine.finish(&mut out);
        matches += out.iter().filter(|o| matches!(o, Output::Match(_))).count() as u64;
        let secs = start.elapsed().as_secs_f64();
        let rate = lines.len() as f64 / secs;
        eprintln!(
            "  {:.0} events/s ({:.2} s), {} matches, peak {} partial matches over {} keys, {} deadlines fired",
            rate,
            secs,
            matches,
            peak.0,
            peak.1,
            engine.stats().timers_fired
        );
        rates.push(rate);
        last = (lines.len(), matches as usize, peak.0, peak.1);
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = rates[rates.len() / 2];
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let pct = |p: f64| if lat.is_empty() { f64::NAN } else { lat[((lat.len() - 1) as f64 * p).round() as usize] };
    let rss_mib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb / 1024);
    if paced {
        println!("embedded at {} events/s: event-to-match p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms over {} matches (last run)", a.rate, pct(0.5), pct(0.95), pct(0.99), lat.len());
    }
    println!("embedded: resident memory {rss_mib} MiB");
    println!(
        "embedded: {} events, {} users, {} rules: median {:.0} events/s over {} runs; {} matches; peak {} partial matches over {} keys",
        last.0,
        a.users,
        specs.len(),
        median,
        rates.len(),
        last.1,
        last.2,
        last.3
    );
    if let Some(p) = a.json {
        let j = serde_json::json!({
            "bench": "embedded", "events": last.0, "users": a.users, "rules": specs.len(), "target_rate": a.rate,
            "median_events_per_s": median, "runs": rates, "matches": last.1,
            "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99)}, "rss_mib": rss_mib,
        });
        use std::io::Write;
        std::fs::OpenOptions::new().create(true).append(true).open(p)?.write_all((j.to_string() + "\n").as_bytes())?;
    }
    Ok(())
}
