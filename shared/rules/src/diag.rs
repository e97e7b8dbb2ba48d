//! Rule diagnostics: what is wrong and exactly where.

use std::fmt;

/// One problem in a rule document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Stable code, e.g. `E101`.
    pub code: &'static str,
    /// Rule id, when the document got that far.
    pub rule: Option<String>,
    /// Stage name (innermost), when the problem is inside a stage.
    pub stage: Option<String>,
    /// The document key at fault (`where`, `times`, …).
    pub key: Option<String>,
    /// Line and column (1-based) inside a condition's SQL text.
    pub position: Option<(u64, u64)>,
    pub message: String,
}

impl Diagnostic {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic { code, rule: None, stage: None, key: None, position: None, message: message.into() }
    }
    pub fn stage(mut self, stage: impl Into<String>) -> Self {
        self.stage = Some(stage.into());
        self
    }
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
    pub fn at(mut self, line: u64, column: u64) -> Self {
        if line > 0 {
            self.position = Some((line, column));
        }
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error[{}]", self.code)?;
        let mut sep = " ";
        if let Some(r) = &self.rule {
            write!(f, "{sep}rule `{r}`")?;
            sep = ", ";
        }
        if let Some(s) = &self.stage {
            write!(f, "{sep}stage `{s}`")?;
            sep = ", ";
        }
        if let Some(k) = &self.key {
            write!(f, "{sep}key `{k}`")?;
        }
        match self.position {
            Some((l, c)) if c > 0 => write!(f, " (line {l}, column {c})")?,
            Some((l, _)) => write!(f, " (line {l})")?,
            None => {}
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one rule document.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn one(d: Diagnostic) -> Self {
        Diagnostics(vec![d])
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Sets the rule id on every diagnostic that lacks one.
    pub fn with_rule(mut self, rule: &str) -> Self {
        for d in &mut self.0 {
            if d.rule.is_none() {
                d.rule = Some(rule.to_string());
            }
        }
        self
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}
