//! Notifier configuration (the `[notifier]` section). Secrets come from the
//! file or, better, from environment overrides such as
//! `CEPHEID__NOTIFIER__TARGETS__GROWTH__SECRET`; they are never printed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

/// A secret value: `Debug` and `Display` print `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifierConfig {
    /// Targets by name; a rule names them as `kind:name` (`feishu:growth`), and `log` needs none.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
    /// Enrichment sources by name (`enrich[].lookup`).
    #[serde(default)]
    pub lookups: BTreeMap<String, LookupConfig>,
    #[serde(default)]
    pub retry: RetryConfig,
    /// JSON-lines file for alerts that could not be delivered (with the last error).
    #[serde(default)]
    pub dead_letter: Option<PathBuf>,
    /// How long a delivered `match_id` is remembered for de-duplication (ms).
    #[serde(default = "default_match_ttl")]
    pub dedupe_ttl_ms: u64,
}

fn default_match_ttl() -> u64 {
    24 * 3_600_000
}

impl Default for NotifierConfig {
    fn default() -> Self {
        NotifierConfig {
            targets: BTreeMap::new(),
            lookups: BTreeMap::new(),
            retry: RetryConfig::default(),
            dead_letter: None,
            dedupe_ttl_ms: default_match_ttl(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeishuFormat {
    #[default]
    Text,
    Card,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Info,
    Warning,
    Critical,
}

impl Severity {
    /// Feishu card header colour.
    pub fn color(self) -> &'static str {
        match self {
            Severity::Info => "blue",
            Severity::Warning => "orange",
            Severity::Critical => "red",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TargetConfig {
    /// A Feishu / Lark custom bot.
    Feishu {
        url: String,
        #[serde(default)]
        secret: Option<Secret>,
        #[serde(default)]
        format: FeishuFormat,
        #[serde(default)]
        severity: Severity,
        /// Link for the card's button.
        #[serde(default)]
        link: Option<String>,
        #[serde(default = "five")]
        per_second: u32,
        #[serde(default = "hundred")]
        per_minute: u32,
        #[serde(default = "timeout")]
        timeout_ms: u64,
    },
    /// JSON POST of the match and the rendered message, signed.
    Webhook {
        url: String,
        #[serde(default)]
        secret: Option<Secret>,
        #[serde(default)]
        headers: BTreeMap<String, String>,
        #[serde(default = "timeout")]
        timeout_ms: u64,
        #[serde(default)]
        per_second: Option<u32>,
    },
    /// A record on a topic of the bus (key: the match id), created if missing.
    Kafka {
        topic: String,
        #[serde(default = "one")]
        partitions: i32,
    },
    /// JSON lines appended to a file.
    File { path: PathBuf },
    /// The rendered message on standard error.
    Log {},
}

impl TargetConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            TargetConfig::Feishu { .. } => "feishu",
            TargetConfig::Webhook { .. } => "webhook",
            TargetConfig::Kafka { .. } => "kafka",
            TargetConfig::File { .. } => "file",
            TargetConfig::Log {} => "log",
        }
    }
}

fn one() -> i32 {
    1
}
fn five() -> u32 {
    5
}
fn hundred() -> u32 {
    100
}
fn timeout() -> u64 {
    5_000
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum LookupConfig {
    /// A Redis hash per value: `pattern` with `{key}` replaced, e.g. `products:{key}`.
    Redis {
        url: String,
        pattern: String,
        #[serde(default = "ttl")]
        ttl_ms: u64,
        #[serde(default = "lookup_timeout")]
        timeout_ms: u64,
    },
    /// An HTTP GET returning a JSON object: `url` with `{key}` replaced.
    Http {
        url: String,
        #[serde(default = "ttl")]
        ttl_ms: u64,
        #[serde(default = "lookup_timeout")]
        timeout_ms: u64,
    },
}

fn ttl() -> u64 {
    60_000
}
fn lookup_timeout() -> u64 {
    300
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per alert and target, the first included.
    #[serde(default = "attempts")]
    pub max_attempts: u32,
    /// First backoff; doubled per attempt, with up to 50% random jitter.
    #[serde(default = "base")]
    pub base_ms: u64,
    #[serde(default = "cap")]
    pub max_ms: u64,
}

fn attempts() -> u32 {
    5
}
fn base() -> u64 {
    500
}
fn cap() -> u64 {
    30_000
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { max_attempts: attempts(), base_ms: base(), max_ms: cap() }
    }
}
