//! The README's first command, in-process: the example rules over the sample
//! clickstream produce alerts, and the sample's late and malformed lines are
//! accounted for.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;

use cepheid_cli::run::Pipeline;
use cepheid_cli::settings::Settings;
use cepheid_engine::engine::ManualClock;

#[test]
fn example_rules_over_the_sample() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir().unwrap();
    let settings = Settings::load(None).unwrap();
    let out = tmp.path().join("alerts.jsonl");
    let mut p = Pipeline::new(
        &settings,
        "clickstream",
        &root.join("rules/examples"),
        Arc::new(ManualClock::new(0)),
        Box::new(std::fs::File::create(&out).unwrap()),
        tmp.path().join("late.jsonl"),
        tmp.path().join("rejected.jsonl"),
        Box::new(std::io::sink()),
    )
    .unwrap();
    let f = std::fs::File::open(root.join("samples/clickstream.jsonl")).unwrap();
    for (i, l) in BufReader::new(f).lines().enumerate() {
        p.line("sample", i as u64 + 1, &l.unwrap()).unwrap();
    }
    p.finish().unwrap();
    let per_rule: std::collections::HashMap<String, u64> = p.engine.matches_per_rule().into_iter().collect();
    for r in ["cross_sell", "cart_abandon_high_value", "high_intent", "price_sensitive", "churn_risk", "hot_product"] {
        assert!(per_rule[r] > 0, "{r} fired no alert on the sample");
    }
    // Rules of other sources see none of the clickstream.
    assert_eq!(per_rule["order_unpaid"], 0);
    assert_eq!(p.late.count, 7);
    assert_eq!(p.rejected.count, 2);
    let alerts = std::fs::read_to_string(out).unwrap();
    let n = alerts.lines().count() as u64;
    assert_eq!(n, per_rule.values().sum::<u64>());
    for l in alerts.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["kind"], "match");
        assert_eq!(v["match_id"].as_str().unwrap().len(), 32);
    }
}
