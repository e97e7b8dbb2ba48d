//! Rule files on disk: which files of a directory are rules, and reading one.
//! Shared by the CLI (`cepheid run`, `cepheid rules apply`) and the load tools.

use std::path::{Path, PathBuf};

use crate::{parse_rule_str, RuleFormat, RuleSpec};

/// The format a rule file's extension names: `.json`, or `.yaml` / `.yml`.
pub fn format_of(p: &Path) -> Option<RuleFormat> {
    match p.extension()?.to_str()? {
        "json" => Some(RuleFormat::Json),
        "yaml" | "yml" => Some(RuleFormat::Yaml),
        _ => None,
    }
}

/// Rule files of a directory (not recursive), sorted.
pub fn rule_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && format_of(p).is_some())
        .collect();
    v.sort();
    Ok(v)
}

/// Reads and checks one rule file (JSON unless its extension says YAML); the
/// error is the rendered diagnostics.
pub fn read_rule_file(p: &Path) -> Result<RuleSpec, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read: {e}"))?;
    let fmt = format_of(p).unwrap_or(RuleFormat::Json);
    parse_rule_str(&text, fmt).map_err(|d| d.to_string())
}
