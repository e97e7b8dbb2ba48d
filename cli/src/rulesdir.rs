//! A directory of rule files, watched: each poll reports which rules were
//! added, changed, deleted or refused, so a running pipeline applies them
//! without a restart and keeps the previous version when a file is broken.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use cepheid_rules::RuleSpec;

pub use cepheid_rules::files::{read_rule_file, rule_files};

/// One change found by a poll.
#[derive(Debug)]
pub enum Change {
    /// A new or changed file with a valid rule: apply it.
    Upsert { file: PathBuf, spec: Box<RuleSpec> },
    /// The file of rule `id` is gone.
    Removed { file: PathBuf, id: String },
    /// A file that cannot be used; whatever ran before keeps running.
    Refused { file: PathBuf, reason: String },
}

struct Seen {
    modified: Option<SystemTime>,
    len: u64,
    /// The rule id this file defines (when it parsed).
    id: Option<String>,
}

/// Watches a directory by polling (portable, and cheap for a few thousand files).
pub struct RulesDir {
    dir: PathBuf,
    seen: BTreeMap<PathBuf, Seen>,
}

impl RulesDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RulesDir { dir: dir.into(), seen: BTreeMap::new() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Changes since the previous poll (the first poll reports every file).
    pub fn poll(&mut self) -> std::io::Result<Vec<Change>> {
        let files = rule_files(&self.dir)?;
        let mut changes = Vec::new();
        let present: std::collections::HashSet<&PathBuf> = files.iter().collect();
        let gone: Vec<PathBuf> = self.seen.keys().filter(|k| !present.contains(k)).cloned().collect();
        for f in gone {
            if let Some(Seen { id: Some(id), .. }) = self.seen.remove(&f) {
                // Another file may define the same id now; only remove when none does.
                if !self.seen.values().any(|s| s.id.as_deref() == Some(&id)) {
                    changes.push(Change::Removed { file: f, id });
                }
            }
        }
        let ids_by_file: HashMap<String, PathBuf> = self
            .seen
            .iter()
            .filter_map(|(f, s)| s.id.clone().map(|id| (id, f.clone())))
            .collect();
        for f in files {
            let meta = std::fs::metadata(&f)?;
            let (modified, len) = (meta.modified().ok(), meta.len());
            if let Some(s) = self.seen.get(&f) {
                if s.modified == modified && s.len == len {
                    continue;
                }
            }
            let entry = Seen { modified, len, id: self.seen.get(&f).and_then(|s| s.id.clone()) };
            match read_rule_file(&f) {
                Ok(spec) => {
                    if let Some(other) = ids_by_file.get(&spec.id).filter(|o| **o != f) {
                        changes.push(Change::Refused {
                            file: f.clone(),
                            reason: format!("rule id `{}` is already defined in {}", spec.id, other.display()),
                        });
                        self.seen.insert(f, entry);
                        continue;
                    }
                    self.seen.insert(f.clone(), Seen { id: Some(spec.id.clone()), ..entry });
                    changes.push(Change::Upsert { file: f, spec: Box::new(spec) });
                }
                Err(reason) => {
                    self.seen.insert(f.clone(), entry);
                    changes.push(Change::Refused { file: f, reason });
                }
            }
        }
        Ok(changes)
    }
}
