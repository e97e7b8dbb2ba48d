//! `cepheid run` over two sources at once, as a user runs it: the sample
//! clickstream and `orders=samples/orders.jsonl`. The order rules fire on the
//! orders — exactly the orders the data says were not paid within 15 minutes —
//! and the clickstream rules give the same alerts as over the clickstream alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cepheid run` over the example rules; the alerts' match ids and keys, by rule.
fn run(dir: &Path, tag: &str, events: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let out = dir.join(format!("{tag}.jsonl"));
    let o = Command::new(env!("CARGO_BIN_EXE_cepheid"))
        .current_dir(root())
        .args(["run", "--quiet", "--rules", "rules/examples", "--out"])
        .arg(&out)
        .arg("--late")
        .arg(dir.join(format!("{tag}-late.jsonl")))
        .arg("--rejected")
        .arg(dir.join(format!("{tag}-rejected.jsonl")))
        .arg("--events")
        .args(events)
        .output()
        .unwrap();
    assert!(o.status.success(), "cepheid run failed: {}", String::from_utf8_lossy(&o.stderr));
    let mut by_rule: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for l in std::fs::read_to_string(out).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        by_rule.entry(v["rule_id"].as_str().unwrap().to_string()).or_default().insert(format!("{} {}", v["match_id"].as_str().unwrap(), v["key"]));
    }
    by_rule
}

#[test]
fn two_sources_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let both = run(dir.path(), "both", &["samples/clickstream.jsonl", "orders=samples/orders.jsonl"]);
    let clicks = run(dir.path(), "clicks", &["samples/clickstream.jsonl"]);

    // The orders the data itself says were not paid within 15 minutes.
    let (mut created, mut paid) = (BTreeMap::new(), BTreeMap::new());
    for l in std::fs::read_to_string(root().join("samples/orders.jsonl")).unwrap().lines() {
        let e: serde_json::Value = serde_json::from_str(l).unwrap();
        let (id, t) = (e["orderId"].as_str().unwrap().to_string(), e["eventTime"].as_i64().unwrap());
        match e["eventType"].as_str().unwrap() {
            "order_created" => created.insert(id, t),
            _ => paid.insert(id, t),
        };
    }
    let unpaid: BTreeSet<String> = created.iter().filter(|(id, c)| paid.get(*id).is_none_or(|p| p - *c >= 15 * 60_000)).map(|(id, _)| id.clone()).collect();
    assert!(!unpaid.is_empty() && unpaid.len() < created.len());
    let alerted: BTreeSet<String> = both["order_unpaid"]
        .iter()
        .map(|l| {
            let key: serde_json::Value = serde_json::from_str(l.split_once(' ').unwrap().1).unwrap();
            key["orderId"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(alerted, unpaid);
    assert!(!both["order_brushing"].is_empty(), "the sample's two order bursts from one device");

    // The other source's rules are untouched by the orders read beside them.
    let of_clicks = |m: &BTreeMap<String, BTreeSet<String>>| -> BTreeMap<String, BTreeSet<String>> {
        m.iter().filter(|(r, _)| !r.starts_with("order_")).map(|(r, s)| (r.clone(), s.clone())).collect()
    };
    assert!(!clicks.is_empty());
    assert!(of_clicks(&both) == clicks, "the clickstream rules' alerts changed when the orders were read beside them");
}
