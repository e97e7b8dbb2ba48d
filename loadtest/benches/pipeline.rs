//! `cargo bench -p cepheid-loadtest`: the engine's performance goals.
//!
//! - five_rules: decode + match of the five e-commerce example rules over a
//!   generated clickstream (20k users), events per second;
//! - open_partials: per-event cost on one key holding 1, 10³, 10⁵ open
//!   partial matches (an event that advances none of them, and one that
//!   starts a new one);
//! - many_rules: per-event cost with 10, 10³, 10⁵ rules that each select on
//!   an equality (one rule per product), through the rule index;
//! - checkpoint_encode: a matcher shard's checkpoint work per key, encoding
//!   key cells ([`KeyCell::encode`]) of the twelve example rules after a
//!   generated steady clickstream, as a shard holds them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cepheid_engine::engine::{Engine, EngineConfig, ManualClock, Output, SourceConfig};
use cepheid_loadtest::clickstream::{generate, Params};
use cepheid_rules::{parse_rule_json, parse_rule_str, RuleFormat};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn example(name: &str) -> cepheid_rules::RuleSpec {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/examples").join(name);
    let fmt = if name.ends_with(".yaml") { RuleFormat::Yaml } else { RuleFormat::Json };
    parse_rule_str(&std::fs::read_to_string(p).unwrap(), fmt).unwrap()
}

fn engine(cfg: EngineConfig) -> Engine {
    Engine::new(cfg, Arc::new(ManualClock::new(0)))
}

fn five_rules(c: &mut Criterion) {
    let lines = generate(&Params { events: 200_000, users: 20_000, ..Params::default() });
    let rules: Vec<_> = ["cross_sell.json", "cart_abandon_high_value.json", "high_intent.yaml", "price_sensitive.json", "churn_risk.json"]
        .iter()
        .map(|f| example(f))
        .collect();
    let mut g = c.benchmark_group("five_rules");
    g.sample_size(10).measurement_time(Duration::from_secs(20)).throughput(Throughput::Elements(lines.len() as u64));
    g.measurement_time(Duration::from_secs(60));
    g.bench_function("decode_match_200k_events_20k_users", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut e = engine(EngineConfig::default());
                for r in &rules {
                    e.upsert_rule(r).unwrap();
                }
                let mut out = Vec::new();
                let owned: Vec<String> = lines.clone();
                let t = Instant::now();
                for l in owned {
                    let ev = e.decode_owned("clickstream", l).unwrap();
                    e.push("clickstream", ev, &mut out);
                    out.clear();
                }
                e.finish(&mut out);
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

fn open_partials(c: &mut Criterion) {
    let cfg = EngineConfig { default_source: SourceConfig { time_field: "t".into(), out_of_orderness_ms: 0 }, ..Default::default() };
    let rule = parse_rule_json(r#"{"id":"wait","version":1,"key_by":"k","pattern":[{"name":"a","where":"kind = 'a'"},{"name":"b","where":"kind = 'b'"}]}"#).unwrap();
    let mut g = c.benchmark_group("open_partials");
    for n in [1usize, 1_000, 100_000] {
        let mut e = engine(cfg.clone());
        e.upsert_rule(&rule).unwrap();
        let mut out = Vec::new();
        let mut t = 0i64;
        for _ in 0..n {
            t += 1;
            let ev = e.decode("s", &format!(r#"{{"t":{t},"k":1,"kind":"a"}}"#)).unwrap();
            e.push("s", ev, &mut out);
        }
        // Release the last one (the watermark must pass it).
        t += 1;
        let ev = e.decode("s", &format!(r#"{{"t":{t},"k":1,"kind":"x"}}"#)).unwrap();
        e.push("s", ev, &mut out);
        assert_eq!(e.state_size().0, n, "setup: {n} open partial matches");
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("unrelated_event", n), &n, |b, _| {
            b.iter(|| {
                t += 1;
                let ev = e.decode("s", &format!(r#"{{"t":{t},"k":1,"kind":"x"}}"#)).unwrap();
                e.push("s", ev, &mut out);
                out.clear();
            })
        });
        let mut e2 = engine(cfg.clone());
        e2.upsert_rule(&rule).unwrap();
        let mut t2 = 0i64;
        for _ in 0..n {
            t2 += 1;
            let ev = e2.decode("s", &format!(r#"{{"t":{t2},"k":1,"kind":"a"}}"#)).unwrap();
            e2.push("s", ev, &mut out);
        }
        g.bench_with_input(BenchmarkId::new("starting_event", n), &n, |b, _| {
            b.iter(|| {
                t2 += 1;
                let ev = e2.decode("s", &format!(r#"{{"t":{t2},"k":1,"kind":"a"}}"#)).unwrap();
                e2.push("s", ev, &mut out);
                out.clear();
            })
        });
    }
    g.finish();
}

fn many_rules(c: &mut Criterion) {
    let cfg = EngineConfig { default_source: SourceConfig { time_field: "t".into(), out_of_orderness_ms: 0 }, ..Default::default() };
    let mut g = c.benchmark_group("many_rules");
    g.sample_size(20);
    for n in [10usize, 1_000, 100_000] {
        let mut e = engine(cfg.clone());
        for i in 0..n {
            let r = parse_rule_json(&format!(
                r#"{{"id":"product_{i}","version":1,"filter":"productId = {i}","key_by":"userId","pattern":[{{"name":"v","where":"kind = 'view'"}},{{"name":"c","where":"kind = 'cart'"}}],"within":"10m"}}"#
            ))
            .unwrap();
            e.upsert_rule(&r).unwrap();
        }
        let mut out = Vec::new();
        let mut t = 0i64;
        let mut x = 12345u64;
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("event", n), &n, |b, _| {
            b.iter(|| {
                t += 1;
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let product = (x >> 33) % n as u64;
                let kind = if x & 1 == 0 { "view" } else { "cart" };
                let ev = e.decode("s", &format!(r#"{{"t":{t},"userId":{},"productId":{product},"kind":"{kind}"}}"#, (x >> 20) % 1000)).unwrap();
                e.push("s", ev, &mut out);
                out.retain(|o| !matches!(o, Output::Match(_)));
            })
        });
    }
    g.finish();
}

/// Key cells as a shard holds them: the twelve example rules (as the local
/// cluster runs them) over a steady clickstream, each key's events stepped in
/// time order with the watermark 2 s behind the stream's newest event.
fn shard_cells() -> Vec<cepheid_engine::cell::KeyCell> {
    use cepheid_engine::cell::{KeyCell, Released};
    let shard = cepheid_loadtest::examples::ShardRules::examples();
    let book = &shard.book;
    let lines = generate(&Params { events: 60_000, users: 20_000, warm_ms: 900_000, ..Params::default() });
    let mut groups: std::collections::HashMap<(String, String), Vec<(i64, String)>> = Default::default();
    let mut newest = i64::MIN;
    for l in &lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else { continue };
        let Some(t) = v["eventTime"].as_i64() else { continue };
        newest = newest.max(t);
        for (sig, key) in shard.keys_of(&v) {
            groups.entry((sig, key)).or_default().push((t, l.clone()));
        }
    }
    let mut cells = Vec::new();
    for ((sig, _), mut evs) in groups {
        let Some(rules) = book.signature(&sig).cloned() else { continue };
        evs.sort_by_key(|(t, _)| *t);
        let released: Vec<Released> =
            evs.into_iter().filter_map(|(t, l)| Some(Released { source: "clickstream".into(), event: book.decode("clickstream", &l, t).ok()? })).collect();
        let mut cell = KeyCell::new();
        let _ = cell.step(&rules, &released, Some(newest - 2_000), newest);
        if !cell.is_idle() {
            cells.push(cell);
        }
    }
    cells
}

fn checkpoint_encode(c: &mut Criterion) {
    let cells = shard_cells();
    let bytes: usize = cells.iter().map(|k| k.encode().len()).sum();
    eprintln!("checkpoint_encode: {} key cells with state, {} bytes encoded ({} per cell)", cells.len(), bytes, bytes / cells.len().max(1));
    let mut g = c.benchmark_group("checkpoint_encode");
    g.sample_size(20).throughput(Throughput::Elements(cells.len() as u64));
    g.bench_function("every_cell", |b| b.iter(|| cells.iter().map(|k| k.encode().len()).sum::<usize>()));
    g.finish();
}

criterion_group!(benches, five_rules, open_partials, many_rules, checkpoint_encode);
criterion_main!(benches);
