//! The example rules (`rules/examples`) as the measurement tools load them,
//! and how the keygen-router keys an event for them: one key per distinct
//! `key_by` whose fields the event has, named as shards name keys
//! (`signature|value|…`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use cepheid_engine::cell::{KeyCell, Released, RuleBook};
use cepheid_engine::engine::EngineConfig;
use cepheid_rules::files::{read_rule_file, rule_files};
use cepheid_rules::RuleSpec;

/// The rules of `rules/examples`, in file-name order.
pub fn rules() -> Vec<RuleSpec> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/examples");
    load_rules(&[root]).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The rules in `paths`: a file is one rule (YAML for `.yaml`/`.yml`, else
/// JSON), a directory holds one per `.json`, `.yaml` or `.yml` file (in
/// file-name order). An error names the file and what is wrong with it.
pub fn load_rules(paths: &[std::path::PathBuf]) -> anyhow::Result<Vec<RuleSpec>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(rule_files(p).map_err(|e| anyhow::anyhow!("{}: cannot read the directory: {e}", p.display()))?);
        } else {
            files.push(p.clone());
        }
    }
    files.iter().map(|p| read_rule_file(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))).collect()
}

/// The example rules loaded as a matcher shard loads them, with their key signatures.
pub struct ShardRules {
    pub book: RuleBook,
    /// Distinct `key_by` lists, in the order first seen.
    pub sigs: Vec<Vec<String>>,
}

impl ShardRules {
    pub fn examples() -> ShardRules {
        let mut book = RuleBook::new(EngineConfig::default());
        let mut sigs: Vec<Vec<String>> = Vec::new();
        for spec in rules() {
            if !sigs.contains(&spec.key_by) {
                sigs.push(spec.key_by.clone());
            }
            book.upsert(&spec).expect("an example rule runs in key cells");
        }
        ShardRules { book, sigs }
    }

    /// The keys an event goes to: per signature whose fields it has, `(signature, key)`.
    pub fn keys_of(&self, event: &serde_json::Value) -> Vec<(String, String)> {
        self.sigs
            .iter()
            .filter_map(|sig| {
                let vals: Option<Vec<String>> = sig.iter().map(|f| event.get(f).filter(|x| !x.is_null()).map(|x| x.to_string())).collect();
                let s = sig.join(",");
                vals.map(|vals| (s.clone(), format!("{s}|{}", vals.join("|"))))
            })
            .collect()
    }
}

/// Key cells as a shard holds them, and the events waiting for the watermark.
#[derive(Default)]
pub struct Cells {
    /// Per key, its cell and its earliest deadline.
    pub cells: HashMap<String, (KeyCell, Option<i64>)>,
    /// `(time, event, key)`: the `key`-th key of event `event` (as
    /// [`ShardRules::route`] lists them), waiting for the watermark.
    pub pending: BinaryHeap<Reverse<(i64, usize, usize)>>,
}

impl ShardRules {
    /// Per event of `lines`: its time and the keys it goes to (the router's part).
    pub fn route(&self, lines: &[String]) -> Vec<(i64, Vec<String>)> {
        lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a generated event");
                let keys = self.keys_of(&v).into_iter().map(|(_, k)| k).collect();
                (v["eventTime"].as_i64().expect("an event time"), keys)
            })
            .collect()
    }

    /// A shard's release at watermark `w`: the waiting events before it, each
    /// decoded for its key, stepped in their keys' cells, and the keys with a
    /// deadline due stepped too; cells left without state dropped. Answers
    /// the keys stepped, and whether each was dropped.
    pub fn release(&self, w: i64, lines: &[String], routed: &[(i64, Vec<String>)], c: &mut Cells) -> Vec<(String, bool)> {
        let mut batches: HashMap<String, Vec<Released>> = HashMap::new();
        while c.pending.peek().is_some_and(|Reverse((t, _, _))| *t < w) {
            let Reverse((t, i, k)) = c.pending.pop().expect("peeked");
            let event = self.book.decode("clickstream", &lines[i], t).expect("a generated event");
            batches.entry(routed[i].1[k].clone()).or_default().push(Released { source: "clickstream".into(), event });
        }
        for (k, (_, d)) in c.cells.iter() {
            if d.is_some_and(|d| d <= w) && !batches.contains_key(k) {
                batches.insert(k.clone(), Vec::new());
            }
        }
        let mut stepped = Vec::with_capacity(batches.len());
        for (key, evs) in batches {
            let sig = key.split('|').next().unwrap_or_default();
            let Some(rules) = self.book.signature(sig) else { continue };
            let (cell, deadline) = c.cells.entry(key.clone()).or_default();
            let out = cell.step(rules, &evs, Some(w), w);
            *deadline = out.deadline;
            if out.idle {
                c.cells.remove(&key);
            }
            stepped.push((key, out.idle));
        }
        stepped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory loads its rule files in name order; a file that cannot be
    /// read or parsed is named in the error (a directory given where a file
    /// was meant used to fail with the OS's bare "Is a directory").
    #[test]
    fn rules_load_from_files_and_directories() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/examples");
        let all = load_rules(std::slice::from_ref(&dir)).unwrap();
        assert!(all.len() >= 10, "{} rules", all.len());
        let ids: Vec<&str> = all.iter().map(|r| r.id.as_str()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "file-name order (the ids follow the file names)");
        let one = load_rules(&[dir.join("churn_risk.json"), dir.join("high_intent.yaml")]).unwrap();
        assert_eq!(one.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["churn_risk", "high_intent"]);
        let missing = load_rules(&[dir.join("nope.json")]).unwrap_err().to_string();
        assert!(missing.contains("nope.json") && missing.contains("cannot read"), "{missing}");
        let tmp = std::env::temp_dir().join(format!("cepheid-bad-rule-{}.json", std::process::id()));
        std::fs::write(&tmp, r#"{"id":"x","version":1,"pattern":[]}"#).unwrap();
        let bad = load_rules(std::slice::from_ref(&tmp)).unwrap_err().to_string();
        std::fs::remove_file(&tmp).unwrap();
        assert!(bad.starts_with(&tmp.display().to_string()), "{bad}");
    }
}
