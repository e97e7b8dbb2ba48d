//! Snapshot + restore at any point mid-stream gives exactly the output of an
//! uninterrupted run (property test), and snapshots written by earlier
//! versions keep loading (fixture).

use std::path::PathBuf;
use std::sync::Arc;

use cepheid_engine::engine::{Engine, EngineConfig, EngineSnapshot, ManualClock, Output, SourceConfig};
use cepheid_rules::{parse_rule_value, RuleSpec};
use proptest::prelude::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A varied set of rules: Flink-checked random cases (skip strategies,
/// windows, timeouts, groups, negation, aggregates), each keyed by `k`.
fn rules() -> Vec<RuleSpec> {
    let dir = root().join("../../tests/conformance-random");
    let mut out = Vec::new();
    for name in ["random-00008", "random-00070", "random-00014", "random-00025", "random-00046", "random-00049", "random-00050", "random-00052"] {
        let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
        let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut rule = doc["rule"].take();
        rule["key_by"] = serde_json::json!(["k"]);
        out.push(parse_rule_value(&rule).unwrap());
    }
    let extra = [
        r#"{"id":"absence","version":1,"key_by":["k"],"pattern":[{"name":"a","where":"name = 'a'"},{"name":"b","where":"name = 'b'","negate":true}],"within":6,"after_match":"skip_past_last_event"}"#,
        r#"{"id":"set","version":1,"key_by":["k"],"pattern":[{"name":"s","all":[{"name":"x","where":"name = 'c'"},{"name":"y","where":"name = 'd'"}]}],"within":9,"emit_timeouts":true}"#,
    ];
    for e in extra {
        out.push(parse_rule_value(&serde_json::from_str(e).unwrap()).unwrap());
    }
    out
}

fn engine(rules: &[RuleSpec]) -> Engine {
    let cfg = EngineConfig {
        default_source: SourceConfig { time_field: "event_time".into(), out_of_orderness_ms: 2 },
        ..Default::default()
    };
    let mut e = Engine::new(cfg, Arc::new(ManualClock::new(0)));
    for r in rules {
        e.upsert_rule(r).unwrap();
    }
    e
}

/// Output without `detected_at` (wall-clock dependent).
fn render(out: &[Output]) -> Vec<String> {
    out.iter()
        .map(|o| match o {
            Output::Match(r) => {
                let mut r = r.clone();
                r.detected_at = 0;
                r.to_json_line()
            }
            Output::Late { event, .. } => format!("late {}", event.raw()),
            Output::MissingKey { event, .. } => format!("no key {}", event.raw()),
        })
        .collect()
}

fn feed(e: &mut Engine, lines: &[String], out: &mut Vec<Output>) {
    for l in lines {
        let ev = e.decode("s", l).unwrap();
        e.push("s", ev, out);
    }
}

fn stream() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec((0u8..5, 0i64..8, 0u8..3, 0i64..4, prop::bool::weighted(0.1)), 5..70).prop_map(|v| {
        let mut t = 0i64;
        v.into_iter()
            .enumerate()
            .map(|(i, (n, price, k, gap, back))| {
                t += gap;
                // Sometimes an event arrives up to 3 ms behind: reordered, or late.
                let et = if back { (t - 3).max(0) } else { t };
                format!(
                    r#"{{"id":{},"name":"{}","price":{},"k":{},"event_time":{}}}"#,
                    i + 1,
                    (b'a' + n) as char,
                    price,
                    k,
                    et
                )
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn restore_anywhere_gives_the_same_output(lines in stream(), cut in 0usize..100) {
        let rules = rules();
        let cut = cut.min(lines.len());

        let mut whole = engine(&rules);
        let mut expected = Vec::new();
        feed(&mut whole, &lines, &mut expected);
        whole.finish(&mut expected);

        let mut first = engine(&rules);
        let mut got = Vec::new();
        feed(&mut first, &lines[..cut], &mut got);
        let text = serde_json::to_string(&first.snapshot()).unwrap();
        drop(first);
        let snap: EngineSnapshot = serde_json::from_str(&text).unwrap();
        let mut second = engine(&rules);
        let report = second.restore(snap).unwrap();
        prop_assert!(report.dropped.is_empty(), "{:?}", report.dropped);
        feed(&mut second, &lines[cut..], &mut got);
        second.finish(&mut got);

        prop_assert_eq!(render(&expected), render(&got));
    }
}

/// A snapshot written by format 1 (committed fixture) restores and continues
/// to the recorded output.
#[test]
fn format_1_fixture_still_loads() {
    let dir = root().join("tests/fixtures/snapshot-v1");
    let rule: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("rule.json")).unwrap()).unwrap();
    let rules = vec![parse_rule_value(&rule).unwrap()];
    let snap: EngineSnapshot = serde_json::from_str(&std::fs::read_to_string(dir.join("snapshot.json")).unwrap()).unwrap();
    let mut e = engine(&rules);
    let report = e.restore(snap).unwrap();
    assert!(report.dropped.is_empty(), "{:?}", report.dropped);
    assert!(report.keys > 0);
    let rest: Vec<String> = std::fs::read_to_string(dir.join("rest.jsonl")).unwrap().lines().map(str::to_string).collect();
    let mut out = Vec::new();
    feed(&mut e, &rest, &mut out);
    e.finish(&mut out);
    let expected: Vec<String> = std::fs::read_to_string(dir.join("expected.jsonl")).unwrap().lines().map(str::to_string).collect();
    assert_eq!(render(&out), expected);
}

/// Writes the fixture (run by hand when a new format is introduced:
/// `cargo test -p cepheid-engine --test snapshot -- --ignored write_fixture`).
#[test]
#[ignore]
fn write_fixture() {
    let dir = root().join("tests/fixtures/snapshot-v1");
    std::fs::create_dir_all(&dir).unwrap();
    let rule = r#"{"id":"fixture","version":1,"key_by":["k"],"pattern":[{"name":"a","where":"name = 'a'"},{"name":"b","where":"name = 'b' AND price > a.price","times":{"min":1},"inner":"any"},{"name":"c","where":"name = 'c'"},{"name":"d","where":"name = 'd'","negate":true}],"within":20,"after_match":"skip_to_next"}"#;
    std::fs::write(dir.join("rule.json"), rule).unwrap();
    let rules = vec![parse_rule_value(&serde_json::from_str(rule).unwrap()).unwrap()];
    let events: Vec<String> = [("a", 1, 0), ("b", 2, 0), ("a", 0, 1), ("b", 3, 0), ("b", 5, 1), ("x", 0, 0), ("c", 0, 0), ("b", 4, 1), ("c", 0, 1), ("d", 0, 1), ("a", 2, 0), ("b", 9, 0), ("c", 1, 0)]
        .iter()
        .enumerate()
        .map(|(i, (n, p, k))| format!(r#"{{"id":{},"name":"{n}","price":{p},"k":{k},"event_time":{}}}"#, i + 1, i * 2))
        .collect();
    let mut e = engine(&rules);
    let mut out = Vec::new();
    feed(&mut e, &events[..8], &mut out);
    std::fs::write(dir.join("snapshot.json"), serde_json::to_string_pretty(&e.snapshot()).unwrap() + "\n").unwrap();
    std::fs::write(dir.join("rest.jsonl"), events[8..].join("\n") + "\n").unwrap();
    let mut rest = Vec::new();
    feed(&mut e, &events[8..], &mut rest);
    e.finish(&mut rest);
    std::fs::write(dir.join("expected.jsonl"), render(&rest).join("\n") + "\n").unwrap();
}

/// The property above is only worth something if the streams produce output.
#[test]
fn generated_streams_produce_matches() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let rules = rules();
    let mut runner = TestRunner::deterministic();
    let mut total = 0;
    for _ in 0..32 {
        let lines = stream().new_tree(&mut runner).unwrap().current();
        let mut e = engine(&rules);
        let mut out = Vec::new();
        feed(&mut e, &lines, &mut out);
        e.finish(&mut out);
        total += out.iter().filter(|o| matches!(o, Output::Match(_))).count();
    }
    assert!(total > 100, "only {total} matches over 32 streams");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The rule index only skips rules that would have done nothing.
    #[test]
    fn index_never_changes_results(lines in stream()) {
        let mut rules = rules();
        for extra in [
            r#"{"id":"gated_filter","version":1,"key_by":["k"],"filter":"name IN ('a', 'b')","pattern":[{"name":"x","where":"name = 'a'"},{"name":"y","where":"name = 'b'","contiguity":"strict"}]}"#,
            r#"{"id":"gated_start","version":1,"key_by":["k"],"pattern":[{"name":"x","where":"name = 'c' AND price > 2"},{"name":"y","where":"price < x.price","contiguity":"strict","times":{"min":1}}],"within":8}"#,
            r#"{"id":"gated_optional_start","version":1,"key_by":["k"],"pattern":[{"name":"x","where":"name = 'd'","optional":true},{"name":"y","where":"name = 'e'"},{"name":"z","where":"name = 'a'","contiguity":"strict"}]}"#,
        ] {
            rules.push(parse_rule_value(&serde_json::from_str(extra).unwrap()).unwrap());
        }
        let mut indexed = engine(&rules);
        let mut plain = engine(&[]);
        plain.disable_index();
        for r in &rules {
            plain.upsert_rule(r).unwrap();
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        feed(&mut indexed, &lines, &mut a);
        indexed.finish(&mut a);
        feed(&mut plain, &lines, &mut b);
        plain.finish(&mut b);
        prop_assert_eq!(render(&a), render(&b));
    }
}
