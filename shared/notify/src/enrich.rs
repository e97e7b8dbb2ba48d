//! Enrichment: dimension data looked up by a value of the match (a Redis
//! hash per value, or an HTTP GET), cached with a TTL. A miss, an error or a
//! timeout renders as an empty object and never holds up delivery for long.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cepheid_rules::EnrichSpec;
use cepheid_types::{Clock, MatchRecord};
use serde_json::{Map, Value};

use crate::config::LookupConfig;

/// Outcome counters (for metrics and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnrichStats {
    pub hits: u64,
    pub misses: u64,
    pub timeouts: u64,
    pub errors: u64,
    pub cached: u64,
}

pub struct Enricher {
    lookups: BTreeMap<String, LookupConfig>,
    redis: Mutex<HashMap<String, redis::aio::MultiplexedConnection>>,
    http: reqwest::Client,
    cache: Mutex<HashMap<(String, String), (i64, Value)>>,
    clock: Arc<dyn Clock>,
    pub stats: Mutex<EnrichStats>,
}

/// The last event's value of `stage.field` in a match.
pub fn match_value(record: &MatchRecord, path: &str) -> Option<String> {
    let (stage, field) = path.split_once('.')?;
    let (_, events) = record.stages.iter().find(|(s, _)| s == stage)?;
    let last: Value = serde_json::from_str(events.last()?.get()).ok()?;
    let mut v = &last;
    for part in field.split('.') {
        v = v.get(part)?;
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

impl Enricher {
    pub fn new(lookups: BTreeMap<String, LookupConfig>, clock: Arc<dyn Clock>) -> Enricher {
        Enricher {
            lookups,
            redis: Mutex::new(HashMap::new()),
            http: reqwest::Client::new(),
            cache: Mutex::new(HashMap::new()),
            clock,
            stats: Mutex::new(EnrichStats::default()),
        }
    }

    /// Alias → looked-up object (empty when missing).
    pub async fn enrich(&self, record: &MatchRecord, specs: &[EnrichSpec]) -> Map<String, Value> {
        let mut out = Map::new();
        for s in specs {
            let v = match match_value(record, &s.key) {
                Some(key) => self.lookup(&s.lookup, &key).await,
                None => {
                    self.stats.lock().unwrap().misses += 1;
                    Value::Object(Map::new())
                }
            };
            out.insert(s.alias.clone(), v);
        }
        out
    }

    async fn lookup(&self, name: &str, key: &str) -> Value {
        let now = self.clock.now();
        if let Some((exp, v)) = self.cache.lock().unwrap().get(&(name.to_string(), key.to_string())) {
            if *exp > now {
                self.stats.lock().unwrap().cached += 1;
                return v.clone();
            }
        }
        let Some(cfg) = self.lookups.get(name) else {
            self.stats.lock().unwrap().errors += 1;
            return Value::Object(Map::new());
        };
        let (ttl, timeout) = match cfg {
            LookupConfig::Redis { ttl_ms, timeout_ms, .. } | LookupConfig::Http { ttl_ms, timeout_ms, .. } => (*ttl_ms, *timeout_ms),
        };
        let fetched = tokio::time::timeout(Duration::from_millis(timeout), self.fetch(cfg, key)).await;
        let value = match fetched {
            Ok(Ok(Some(v))) => {
                self.stats.lock().unwrap().hits += 1;
                v
            }
            Ok(Ok(None)) => {
                self.stats.lock().unwrap().misses += 1;
                Value::Object(Map::new())
            }
            Ok(Err(_)) => {
                self.stats.lock().unwrap().errors += 1;
                return Value::Object(Map::new());
            }
            Err(_) => {
                self.stats.lock().unwrap().timeouts += 1;
                return Value::Object(Map::new());
            }
        };
        self.cache.lock().unwrap().insert((name.to_string(), key.to_string()), (now + ttl as i64, value.clone()));
        value
    }

    async fn fetch(&self, cfg: &LookupConfig, key: &str) -> Result<Option<Value>, String> {
        match cfg {
            LookupConfig::Redis { url, pattern, .. } => {
                let con = self.redis.lock().unwrap().get(url).cloned();
                let mut con = match con {
                    Some(c) => c,
                    None => {
                        let c = redis::Client::open(url.as_str())
                            .map_err(|e| e.to_string())?
                            .get_multiplexed_async_connection()
                            .await
                            .map_err(|e| e.to_string())?;
                        self.redis.lock().unwrap().insert(url.clone(), c.clone());
                        c
                    }
                };
                let h: Vec<(String, String)> =
                    redis::cmd("HGETALL").arg(pattern.replace("{key}", key)).query_async(&mut con).await.map_err(|e| e.to_string())?;
                if h.is_empty() {
                    return Ok(None);
                }
                Ok(Some(Value::Object(h.into_iter().map(|(k, v)| (k, Value::String(v))).collect())))
            }
            LookupConfig::Http { url, .. } => {
                let r = self.http.get(url.replace("{key}", &encode(key))).send().await.map_err(|e| e.to_string())?;
                if r.status() == reqwest::StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                if !r.status().is_success() {
                    return Err(format!("HTTP {}", r.status()));
                }
                let v: Value = r.json().await.map_err(|e| e.to_string())?;
                Ok(Some(v))
            }
        }
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
