//! Keys stepped one by one ([`KeyCell`], as matcher shards run them) give
//! exactly the matches of the whole [`Engine`] on the same input: the
//! example rules over the committed sample, with the watermark advanced
//! after every event (as the engine does) and only every 500 events (as a
//! shard hearing a router's periodic watermark does); and the same on every
//! conformance case under `tests/`, also through each key's stored form.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::PathBuf;
use std::sync::Arc;

use cepheid_engine::cell::{KeyCell, Released, RuleBook};
use cepheid_engine::engine::{Engine, EngineConfig, ManualClock, Output};
use cepheid_engine::key::KeyVals;
use cepheid_rules::{parse_rule_str, RuleFormat, RuleSpec};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn example_rules() -> Vec<RuleSpec> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(root().join("rules/examples")).unwrap() {
        let p = e.unwrap().path();
        let fmt = match p.extension().and_then(|x| x.to_str()) {
            Some("json") => RuleFormat::Json,
            Some("yaml") | Some("yml") => RuleFormat::Yaml,
            _ => continue,
        };
        v.push(parse_rule_str(&std::fs::read_to_string(&p).unwrap(), fmt).unwrap());
    }
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

fn sample() -> Vec<String> {
    std::fs::read_to_string(root().join("samples/clickstream.jsonl")).unwrap().lines().map(str::to_string).collect()
}

fn engine_ids(rules: &[RuleSpec], lines: &[String]) -> Vec<String> {
    engine_outputs(rules, lines, &EngineConfig::default(), "clickstream")
}

/// The whole engine's match and timeout records (`kind rule match_id`, sorted).
fn engine_outputs(rules: &[RuleSpec], lines: &[String], cfg: &EngineConfig, source: &str) -> Vec<String> {
    let mut e = Engine::new(cfg.clone(), Arc::new(ManualClock::new(0)));
    for r in rules {
        e.upsert_rule(r).unwrap();
    }
    let mut out = Vec::new();
    for l in lines {
        if let Ok(ev) = e.decode(source, l) {
            e.push(source, ev, &mut out);
        }
    }
    e.finish(&mut out);
    let mut ids: Vec<String> = out
        .into_iter()
        .filter_map(|o| match o {
            Output::Match(m) => Some(format!("{:?} {} {}", m.kind, m.rule_id, m.match_id)),
            _ => None,
        })
        .collect();
    ids.sort();
    ids
}

thread_local! {
    /// Cells that went through their stored form holding aggregate states (per test: each runs on its own thread).
    static STORED_WITH_AGGREGATES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// `every`: events between watermarks. `stored`: after every step each key
/// goes through its stored (binary) form and on from the restored cell, as
/// if it had been passivated.
fn cell_ids(rules: &[RuleSpec], lines: &[String], every: usize, stored: bool) -> Vec<String> {
    cell_outputs(rules, lines, &EngineConfig::default(), "clickstream", every, stored)
}

/// What [`cell_ids`] does, for any configuration and source; records as
/// [`engine_outputs`] renders them.
fn cell_outputs(rules: &[RuleSpec], lines: &[String], cfg: &EngineConfig, source: &str, every: usize, stored: bool) -> Vec<String> {
    let cfg = cfg.clone();
    let bound = cfg.default_source.out_of_orderness_ms;
    let mut book = RuleBook::new(cfg.clone());
    for r in rules {
        book.upsert(r).unwrap();
    }
    // What the router does: per signature, the key of each event (lateness decided here).
    let mut probe = Engine::new(cfg.clone(), Arc::new(ManualClock::new(0)));
    let sigs: Vec<(String, Vec<String>)> = {
        let mut s: Vec<(String, Vec<String>)> = rules.iter().map(|r| (r.key_by.join(","), r.key_by.clone())).collect();
        s.sort();
        s.dedup();
        s
    };
    let mut reg = cepheid_types::FieldRegistry::new();
    let fields: Vec<Vec<cepheid_types::FieldId>> = sigs.iter().map(|(_, f)| f.iter().map(|x| reg.intern(x)).collect()).collect();
    let time = reg.intern(&cfg.default_source.time_field);
    let mut pending: BinaryHeap<Reverse<(i64, u64, String, String)>> = BinaryHeap::new();
    let mut cells: BTreeMap<String, (KeyCell, Option<i64>)> = BTreeMap::new();
    let mut ids = Vec::new();
    let mut max = i64::MIN;
    let mut released = i64::MIN;
    let mut arrival = 0u64;
    let step = |w: i64, pending: &mut BinaryHeap<Reverse<(i64, u64, String, String)>>, cells: &mut BTreeMap<String, (KeyCell, Option<i64>)>, ids: &mut Vec<String>| {
        let mut batches: BTreeMap<String, Vec<Released>> = BTreeMap::new();
        while pending.peek().is_some_and(|Reverse(p)| p.0 < w) {
            let Reverse((t, _, key, raw)) = pending.pop().unwrap();
            let event = book.decode(source, &raw, t).unwrap();
            batches.entry(key).or_default().push(Released { source: source.into(), event });
        }
        // Keys with a deadline due step too (as from a shard's timer index).
        let due: Vec<String> = cells.iter().filter(|(_, (_, d))| d.is_some_and(|d| d <= w)).map(|(k, _)| k.clone()).collect();
        for k in due {
            batches.entry(k).or_default();
        }
        for (key, evs) in batches {
            let sig = key.split('|').next().unwrap();
            let Some(rules) = book.signature(sig) else { continue };
            let (cell, deadline) = cells.entry(key.clone()).or_default();
            let out = cell.step(rules, &evs, Some(w), 0);
            *deadline = out.deadline;
            ids.extend(out.records.into_iter().map(|m| format!("{:?} {} {}", m.kind, m.rule_id, m.match_id)));
            if out.idle {
                cells.remove(&key);
            } else if stored {
                let bytes = cell.encode();
                let back = cepheid_engine::cellcodec::decode(&bytes).unwrap_or_else(|e| panic!("key {key}: {e}"));
                assert_eq!(back, cell.snapshot(), "key {key}: the binary form reads back as the snapshot");
                assert_eq!(cepheid_engine::cellcodec::decode(&cell.encode_as(2)).unwrap(), back, "key {key}: binary format 2 (aggregates as JSON) still reads");
                if back.rules.iter().any(|r| r.state.partial.iter().chain(&r.state.completed).any(|c| c.aggs.is_some())) {
                    STORED_WITH_AGGREGATES.with(|n| n.set(n.get() + 1));
                }
                let json = serde_json::to_vec(&back).unwrap();
                assert_eq!(cepheid_engine::cellcodec::decode(&json).unwrap(), back, "key {key}: the JSON form of earlier checkpoints still reads");
                let (restored, dropped) = KeyCell::restore(back, rules, &book);
                assert!(dropped.is_empty(), "key {key}: {dropped:?}");
                *cell = restored;
            }
        }
    };
    for (n, l) in lines.iter().enumerate() {
        let Ok(ev) = cepheid_types::EventDecoder::new(&reg, time).decode(l) else { continue };
        let _ = probe.decode(source, l);
        let t = ev.time();
        if max != i64::MIN && t < max - bound {
            continue; // late
        }
        max = max.max(t);
        arrival += 1;
        for ((name, _), f) in sigs.iter().zip(&fields) {
            if let Some(k) = KeyVals::of(&ev, f) {
                pending.push(Reverse((t, arrival, format!("{name}|{}", k.repr()), l.clone())));
            }
        }
        if n % every == 0 && max - bound > released {
            released = max - bound;
            step(released, &mut pending, &mut cells, &mut ids);
        }
    }
    step(i64::MAX, &mut pending, &mut cells, &mut ids);
    ids.sort();
    ids
}

#[test]
fn key_cells_give_the_engines_matches() {
    let rules = example_rules();
    let lines = sample();
    let want = engine_ids(&rules, &lines);
    assert!(want.len() > 100);
    for (every, stored) in [(1, false), (500, false), (500, true)] {
        let got = cell_ids(&rules, &lines, every, stored);
        assert_eq!(got.len(), want.len(), "watermark every {every} events, stored {stored}");
        assert_eq!(got, want, "watermark every {every} events, stored {stored}");
    }
}

/// A processing-time rule is refused by the key cells (they run event time
/// only) with a diagnostic naming the rule, instead of running with other results.
#[test]
fn processing_time_rules_are_refused_by_key_cells() {
    let spec = cepheid_rules::parse_rule_json(r#"{"id":"pt","version":1,"time":"processing","key_by":["userId"],"pattern":[{"name":"a"}]}"#).unwrap();
    let mut book = RuleBook::new(EngineConfig::default());
    let err = book.upsert(&spec).unwrap_err().to_string();
    assert!(err.contains("E200") && err.contains("`pt`") && err.contains("processing"), "{err}");
    assert_eq!(book.len(), 0);
}

/// Every conformance case (Flink's own CEP tests, the extensions, the random
/// Flink-checked suite, Cepheid's own) run through key cells as a matcher shard
/// runs them gives exactly the whole engine's records — which pass the cases —
/// with the watermark after every event, and with it after every third event
/// and each key through its stored form after every step.
#[test]
fn key_cells_give_the_engines_records_on_every_conformance_case() {
    use cepheid_engine::engine::SourceConfig;
    use cepheid_engine::testcase::{collect_case_files, TestCase};
    let dirs: Vec<PathBuf> = ["conformance", "conformance-random", "cepheid"].iter().map(|d| root().join("tests").join(d)).collect();
    let cfg = EngineConfig { default_source: SourceConfig { time_field: "event_time".into(), out_of_orderness_ms: 0 }, ..EngineConfig::default() };
    let (mut compared, mut skipped, mut failed) = (0, Vec::new(), Vec::new());
    for f in collect_case_files(&dirs).unwrap() {
        let case = TestCase::load(&f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(spec) = cepheid_rules::parse_rule_value(&case.rule) else { continue }; // a case of a refused rule
        if case.expected_error.is_some() {
            continue;
        }
        if RuleBook::new(cfg.clone()).upsert(&spec).is_err() {
            skipped.push(name); // processing time: not run by key cells (E200)
            continue;
        }
        let source = spec.source.clone().unwrap_or_else(|| "test".into());
        let lines: Vec<String> = case.events.iter().map(|e| e.to_string()).collect();
        let rules = [spec];
        let want = engine_outputs(&rules, &lines, &cfg, &source);
        for (every, stored) in [(1, false), (3, true)] {
            let got = cell_outputs(&rules, &lines, &cfg, &source, every, stored);
            if got != want {
                failed.push(format!("{name} (watermark every {every}, stored {stored}):\n  engine {want:?}\n  cells  {got:?}"));
            }
        }
        compared += 1;
    }
    assert!(compared > 600, "{compared} cases compared");
    // The aggregate rules among them went through the stored form holding aggregate states.
    let with_aggs = STORED_WITH_AGGREGATES.with(|n| n.get());
    assert!(with_aggs > 50, "only {with_aggs} stored cells held aggregate states");
    assert!(skipped.len() < 20, "skipped (refused by key cells): {skipped:?}");
    assert!(failed.is_empty(), "{} of {compared} cases differ:\n{}", failed.len(), failed.join("\n"));
}
