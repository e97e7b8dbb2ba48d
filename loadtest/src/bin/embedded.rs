//! Load driver for the embedded engine: generates a clickstream in memory,
//! then decodes and matches it on one thread, and reports events/s and state
//! size. `cargo run --release -p cepheid-loadtest --bin embedded -- --help`

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

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
    /// Rule files to load (default: the five e-commerce example rules).
    #[arg(long)]
    rules: Vec<PathBuf>,
    /// Repeat the measurement this many times and report the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
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
    let specs: Vec<_> = rules
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p)?;
            let fmt = if p.extension().is_some_and(|x| x == "yaml") {
                cepheid_rules::RuleFormat::Yaml
            } else {
                cepheid_rules::RuleFormat::Json
            };
            cepheid_rules::parse_rule_str(&text, fmt).map_err(|d| anyhow::anyhow!("{}: {d}", p.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    let t0 = Instant::now();
    let lines = generate(&Params { events: a.events, users: a.users, products: a.products, ..Params::default() });
    eprintln!("generated {} events in {:.1} s", lines.len(), t0.elapsed().as_secs_f64());

    let mut rates = Vec::new();
    let mut last = (0, 0, 0, 0);
    for _ in 0..a.runs.max(1) {
        let mut engine = Engine::new(EngineConfig::default(), Arc::new(ManualClock::new(0)));
        for s in &specs {
            engine.upsert_rule(s)?;
        }
        let mut out = Vec::new();
        let mut matches = 0u64;
        let mut peak = (0usize, 0usize);
        let start = Instant::now();
        for (i, l) in lines.iter().enumerate() {
            let e = engine.decode_owned("clickstream", l.clone())?;
            engine.push("clickstream", e, &mut out);
            matches += out.iter().filter(|o| matches!(o, Output::Match(_))).count() as u64;
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
        let j = serde_json::json!({"bench": "embedded", "events": last.0, "users": a.users, "rules": specs.len(), "median_events_per_s": median, "runs": rates, "matches": last.1});
        std::fs::write(p, j.to_string() + "\n")?;
    }
    Ok(())
}
