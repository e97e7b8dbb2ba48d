//! The example rules (`rules/examples`) as the measurement tools load them,
//! and how the keygen-router keys an event for them: one key per distinct
//! `key_by` whose fields the event has, named as shards name keys
//! (`signature|value|…`).

use cepheid_engine::cell::RuleBook;
use cepheid_engine::engine::EngineConfig;
use cepheid_rules::{parse_rule_str, RuleFormat, RuleSpec};

/// The rules of `rules/examples`, in file-name order.
pub fn rules() -> Vec<RuleSpec> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/examples");
    let mut files: Vec<_> = std::fs::read_dir(&root).expect("rules/examples").flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let fmt = match p.extension().and_then(|x| x.to_str()) {
                Some("yaml") => RuleFormat::Yaml,
                Some("json") => RuleFormat::Json,
                _ => return None,
            };
            let text = std::fs::read_to_string(&p).expect("a rule file");
            Some(parse_rule_str(&text, fmt).unwrap_or_else(|e| panic!("{}: {e:?}", p.display())))
        })
        .collect()
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
