//! The notifier: dedupe, delay, enrichment, rendering, and one worker per
//! target with its own queue, rate limits, retries and dead-lettering.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cepheid_rules::ActionSpec;
use cepheid_types::{Clock, ManualClock, MatchRecord};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use crate::config::{NotifierConfig, TargetConfig};
use crate::enrich::Enricher;
use crate::stores::Store;
use crate::targets::{Job, SendError, Target};
use crate::template::{context, default_message, Templates};
use crate::NotifyError;

/// How the notifier waits (backoff, rate limits).
pub trait Sleeper: Send + Sync {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Real waiting.
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// For tests: waiting moves a [`ManualClock`] forward at once.
pub struct ClockSleeper(pub ManualClock);

impl Sleeper for ClockSleeper {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.0.advance(d.as_millis() as i64);
        Box::pin(tokio::task::yield_now())
    }
}

/// What the notifier runs on.
pub struct NotifierDeps {
    pub clock: Arc<dyn Clock>,
    pub sleeper: Arc<dyn Sleeper>,
    pub store: Store,
    /// Seed of the backoff jitter.
    pub seed: u64,
    /// The bus, for `kafka` targets.
    pub bus: Option<cepheid_bus::Bus>,
}

/// Delivery counters of one target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TargetMetrics {
    pub sent: u64,
    pub retried: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    pub deduplicated: u64,
    pub attempts: u64,
    pub latency_ms_sum: u64,
    pub latency_ms_max: u64,
}

/// Counters of all targets.
pub type Metrics = BTreeMap<String, TargetMetrics>;

/// What `submit` did with a match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Handed to this many target queues.
    Queued(usize),
    /// Held until this time (ms).
    Delayed(i64),
    /// Dropped: an alert for this rule and key went out within `dedupe`.
    Deduplicated,
}

#[derive(Serialize, Deserialize)]
struct DelayedItem {
    record: serde_json::Value,
    rule_name: String,
    targets: Vec<String>,
    template: Option<String>,
    enrich: Vec<(String, String, String)>,
}

struct Inner {
    cfg: NotifierConfig,
    clock: Arc<dyn Clock>,
    sleeper: Arc<dyn Sleeper>,
    store: Store,
    templates: Templates,
    enricher: Enricher,
    metrics: Mutex<Metrics>,
    dead: Mutex<Option<std::io::BufWriter<std::fs::File>>>,
    pending: AtomicUsize,
    idle: Notify,
    rng: Mutex<u64>,
    /// (rule, target) pairs whose dead-lettered alerts were logged once already.
    told: Mutex<std::collections::HashSet<(String, String)>>,
}

/// The notifier. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
    queues: Arc<HashMap<String, mpsc::UnboundedSender<Job>>>,
}

impl Notifier {
    /// Builds every configured target (plus `log`) and starts their workers.
    pub async fn start(cfg: NotifierConfig, deps: NotifierDeps) -> Result<Notifier, NotifyError> {
        for tc in cfg.targets.values() {
            if let (TargetConfig::Kafka { topic, partitions }, Some(bus)) = (tc, &deps.bus) {
                bus.create_topic(topic, *partitions).await.map_err(|e| NotifyError::Io(std::io::Error::other(e.to_string())))?;
            }
        }
        let bus = deps.bus.clone();
        let dead = match &cfg.dead_letter {
            Some(p) => Some(std::io::BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?)),
            None => None,
        };
        let inner = Arc::new(Inner {
            enricher: Enricher::new(cfg.lookups.clone(), deps.clock.clone()),
            cfg,
            clock: deps.clock,
            sleeper: deps.sleeper,
            store: deps.store,
            templates: Templates::default(),
            metrics: Mutex::new(BTreeMap::new()),
            dead: Mutex::new(dead),
            pending: AtomicUsize::new(0),
            idle: Notify::new(),
            rng: Mutex::new(deps.seed | 1),
            told: Mutex::default(),
        });
        let mut targets: Vec<(String, TargetConfig)> = inner.cfg.targets.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if !inner.cfg.targets.contains_key("log") {
            targets.push(("log".into(), TargetConfig::Log {}));
        }
        let mut queues = HashMap::new();
        for (name, tc) in targets {
            let target = Target::build(&tc, bus.as_ref())?;
            let (tx, rx) = mpsc::unbounded_channel();
            inner.metrics.lock().unwrap().insert(name.clone(), TargetMetrics::default());
            tokio::spawn(worker(inner.clone(), name.clone(), tc, target, rx));
            queues.insert(name, tx);
        }
        Ok(Notifier { inner, queues: Arc::new(queues) })
    }

    /// `kind:name` (or `log`) → the configured target's name.
    pub fn resolve(&self, target: &str) -> Result<String, NotifyError> {
        let (kind, name) = match target.split_once(':') {
            Some((k, n)) => (k, n),
            None => (target, target),
        };
        let configured = if name == "log" && !self.inner.cfg.targets.contains_key("log") {
            "log"
        } else {
            self.inner.cfg.targets.get(name).map(|t| t.kind()).ok_or_else(|| NotifyError::UnknownTarget(target.to_string()))?
        };
        if configured != kind {
            return Err(NotifyError::KindMismatch { target: name.to_string(), configured: configured.into(), named: kind.into() });
        }
        Ok(name.to_string())
    }

    /// Takes a match and its rule's action.
    ///
    /// A target the rule names but this notifier does not have (or has as
    /// another kind) cannot take the alert now or later: the alert is written
    /// to the dead-letter output for that target, with the reason, and goes
    /// to the rule's other targets. One bad rule never stops the notifier.
    pub async fn submit(&self, record: &MatchRecord, rule_name: &str, action: &ActionSpec) -> Result<Submitted, NotifyError> {
        let mut targets: Vec<String> = Vec::with_capacity(action.targets.len());
        for t in &action.targets {
            match self.resolve(t) {
                Ok(name) => targets.push(name),
                Err(e) => self.dead_letter_match(record, t, &format!("rule `{}`: {e}", record.rule_id)),
            }
        }
        if targets.is_empty() {
            return Ok(Submitted::Queued(0));
        }
        if let Some(window) = action.dedupe {
            let key = format!("dedupe:{}:{}", record.rule_id, serde_json::to_string(&record.key).unwrap_or_default());
            if !self.inner.store.set_once(&key, &record.match_id, window as u64, &*self.inner.clock).await? {
                let mut m = self.inner.metrics.lock().unwrap();
                for t in &targets {
                    m.entry(t.clone()).or_default().deduplicated += 1;
                }
                return Ok(Submitted::Deduplicated);
            }
        }
        if let Some(delay) = action.delay {
            let due = self.inner.clock.now() + delay;
            let item = DelayedItem {
                record: serde_json::from_str(&record.to_json_line()).unwrap_or_default(),
                rule_name: rule_name.to_string(),
                targets,
                template: action.template.clone(),
                enrich: action.enrich.iter().map(|e| (e.lookup.clone(), e.key.clone(), e.alias.clone())).collect(),
            };
            self.inner.store.delay(due, serde_json::to_string(&item).unwrap()).await?;
            return Ok(Submitted::Delayed(due));
        }
        self.deliver(record, rule_name, &targets, action.template.as_deref(), &action.enrich).await;
        Ok(Submitted::Queued(targets.len()))
    }

    /// Writes a match that no delivery was attempted for to the dead-letter
    /// output (no attempts; not retryable), counted under `target` — what the
    /// alert was meant for (a rule's target name, or `*` for all of them).
    pub fn dead_letter_match(&self, record: &MatchRecord, target: &str, error: &str) {
        // Logged once per rule and target (a misconfigured rule would repeat it
        // for every match); the dead-letter output and its counter get each one.
        if self.inner.told.lock().unwrap().insert((record.rule_id.clone(), target.to_string())) {
            tracing::warn!(match_id = %record.match_id, rule_id = %record.rule_id, target, "notifier: match dead-lettered (said once per rule and target): {error}");
        }
        let record_json: serde_json::Value = serde_json::from_str(&record.to_json_line()).unwrap_or_default();
        let line = serde_json::json!({
            "target": target, "attempts": 0, "error": error, "retryable": false, "message": null, "match": record_json,
        });
        write_dead_letter(&self.inner, target, line);
    }

    /// Delivers delayed alerts that are due (call periodically). Returns how many.
    pub async fn poll_delayed(&self) -> Result<usize, NotifyError> {
        let due = self.inner.store.take_due(self.inner.clock.now()).await?;
        let n = due.len();
        for item in due {
            let Ok(it) = serde_json::from_str::<DelayedItem>(&item) else { continue };
            let Ok(record) = MatchRecord::from_json_line(&it.record.to_string()) else { continue };
            let enrich: Vec<cepheid_rules::EnrichSpec> =
                it.enrich.into_iter().map(|(lookup, key, alias)| cepheid_rules::EnrichSpec { lookup, key, alias }).collect();
            self.deliver(&record, &it.rule_name, &it.targets, it.template.as_deref(), &enrich).await;
        }
        Ok(n)
    }

    async fn deliver(&self, record: &MatchRecord, rule_name: &str, targets: &[String], template: Option<&str>, enrich: &[cepheid_rules::EnrichSpec]) {
        // Pending from the start (enrichment may take up to its timeout), so
        // `idle()` — and the service's commits — wait for this match too.
        self.inner.pending.fetch_add(1, Ordering::SeqCst);
        self.deliver_inner(record, rule_name, targets, template, enrich).await;
        if self.inner.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }

    async fn deliver_inner(&self, record: &MatchRecord, rule_name: &str, targets: &[String], template: Option<&str>, enrich: &[cepheid_rules::EnrichSpec]) {
        let enrichments = self.inner.enricher.enrich(record, enrich).await;
        let message = match template {
            Some(t) => {
                let ctx = context(record, rule_name, &enrichments);
                match self.inner.templates.render(t, &ctx) {
                    Ok(m) => m,
                    Err(e) => format!("{} (template failed: {e})", default_message(record, rule_name)),
                }
            }
            None => default_message(record, rule_name),
        };
        let record_json: serde_json::Value = serde_json::from_str(&record.to_json_line()).unwrap_or_default();
        let (title, message, record_json) = (Arc::<str>::from(rule_name), Arc::<str>::from(message), Arc::new(record_json));
        for t in targets {
            if let Some(q) = self.queues.get(t) {
                self.inner.pending.fetch_add(1, Ordering::SeqCst);
                let job = Job {
                    target: t.clone(),
                    match_id: record.match_id.clone(),
                    rule_id: record.rule_id.clone(),
                    title: title.clone(),
                    message: message.clone(),
                    record: record_json.clone(),
                    attempt: 0,
                };
                if q.send(job).is_err() {
                    self.inner.pending.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// Waits until every queued job is delivered or dead-lettered.
    pub async fn idle(&self) {
        loop {
            let n = self.inner.idle.notified();
            if self.inner.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            n.await;
        }
    }

    pub fn metrics(&self) -> Metrics {
        self.inner.metrics.lock().unwrap().clone()
    }

    pub fn enrich_stats(&self) -> crate::enrich::EnrichStats {
        self.inner.enricher.stats.lock().unwrap().clone()
    }

    /// Delayed alerts waiting.
    pub async fn delayed(&self) -> Result<usize, NotifyError> {
        self.inner.store.delayed_len().await
    }
}

/// Sliding-window rate limits (per second, per minute).
struct Limiter {
    per_sec: Option<u32>,
    per_min: Option<u32>,
    sent: VecDeque<i64>,
}

impl Limiter {
    fn for_target(tc: &TargetConfig) -> Limiter {
        let (per_sec, per_min) = match tc {
            TargetConfig::Feishu { per_second, per_minute, .. } => (Some(*per_second), Some(*per_minute)),
            TargetConfig::Webhook { per_second, .. } => (*per_second, None),
            _ => (None, None),
        };
        Limiter { per_sec, per_min, sent: VecDeque::new() }
    }

    async fn acquire(&mut self, clock: &dyn Clock, sleeper: &dyn Sleeper) {
        loop {
            let now = clock.now();
            while self.sent.front().is_some_and(|t| *t <= now - 60_000) {
                self.sent.pop_front();
            }
            let mut wait = 0i64;
            if let Some(lim) = self.per_sec {
                let recent: Vec<i64> = self.sent.iter().copied().filter(|t| *t > now - 1_000).collect();
                if recent.len() >= lim as usize {
                    wait = wait.max(recent[recent.len() - lim as usize] + 1_000 - now);
                }
            }
            if let Some(lim) = self.per_min {
                if self.sent.len() >= lim as usize {
                    wait = wait.max(self.sent[self.sent.len() - lim as usize] + 60_000 - now);
                }
            }
            if wait <= 0 {
                self.sent.push_back(now);
                return;
            }
            sleeper.sleep(Duration::from_millis(wait as u64)).await;
        }
    }
}

fn backoff(inner: &Inner, attempt: u32) -> Duration {
    let r = &inner.cfg.retry;
    let exp = r.base_ms.saturating_mul(1u64 << attempt.min(20)).min(r.max_ms);
    let mut x = inner.rng.lock().unwrap();
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    let jitter = if exp > 1 { *x % (exp / 2).max(1) } else { 0 };
    Duration::from_millis(exp + jitter)
}

/// Jobs a target's worker takes together: one Redis round trip asks which
/// were delivered already, one marks the ones it delivered.
const WORKER_BATCH: usize = 128;

async fn worker(inner: Arc<Inner>, name: String, tc: TargetConfig, target: Target, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut limiter = Limiter::for_target(&tc);
    let delivered_ttl = inner.cfg.dedupe_ttl_ms;
    let mut batch: Vec<Job> = Vec::new();
    while let Some(job) = rx.recv().await {
        batch.push(job);
        while batch.len() < WORKER_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let keys: Vec<String> = batch.iter().map(|j| format!("delivered:{name}:{}", j.match_id)).collect();
        // Redis unreachable: deliver (at least once) rather than hold alerts back.
        let already = inner.store.which_set(&keys, &*inner.clock).await.unwrap_or_else(|_| vec![false; keys.len()]);
        let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let mut delivered: Vec<String> = Vec::new();
        let n = batch.len();
        for ((mut job, key), done) in batch.drain(..).zip(&keys).zip(already) {
            // Delivered before, or a second copy of a match delivered in this very batch.
            if done || seen.contains(key.as_str()) {
                inner.metrics.lock().unwrap().entry(name.clone()).or_default().deduplicated += 1;
                continue;
            }
            loop {
                limiter.acquire(&*inner.clock, &*inner.sleeper).await;
                let t0 = inner.clock.now();
                let r = target.send(&job, &*inner.clock).await;
                let took = (inner.clock.now() - t0).max(0) as u64;
                let retry_wait = {
                    let mut m = inner.metrics.lock().unwrap();
                    let tm = m.entry(name.clone()).or_default();
                    tm.attempts += 1;
                    tm.latency_ms_sum += took;
                    tm.latency_ms_max = tm.latency_ms_max.max(took);
                    match &r {
                        Ok(()) => {
                            tm.sent += 1;
                            None
                        }
                        Err(SendError { retryable: true, .. }) if job.attempt + 1 < inner.cfg.retry.max_attempts => {
                            tm.retried += 1;
                            Some(backoff(&inner, job.attempt))
                        }
                        Err(_) => {
                            tm.failed += 1;
                            None
                        }
                    }
                };
                match (r, retry_wait) {
                    (Ok(()), _) => {
                        seen.insert(key.as_str());
                        delivered.push(key.clone());
                        break;
                    }
                    (Err(_), Some(wait)) => {
                        inner.sleeper.sleep(wait).await;
                        job.attempt += 1;
                    }
                    (Err(e), None) => {
                        dead_letter(&inner, &name, &job, &e);
                        break;
                    }
                }
            }
        }
        let _ = inner.store.set_all(&delivered, delivered_ttl, &*inner.clock).await;
        if inner.pending.fetch_sub(n, Ordering::SeqCst) == n {
            inner.idle.notify_waiters();
        }
    }
}

fn dead_letter(inner: &Inner, target: &str, job: &Job, e: &SendError) {
    let line = serde_json::json!({
        "target": target, "attempts": job.attempt + 1, "error": e.message, "retryable": e.retryable,
        "message": &*job.message, "match": &*job.record,
    });
    write_dead_letter(inner, target, line);
}

fn write_dead_letter(inner: &Inner, target: &str, line: serde_json::Value) {
    inner.metrics.lock().unwrap().entry(target.to_string()).or_default().dead_lettered += 1;
    let line = line.to_string();
    let mut d = inner.dead.lock().unwrap();
    match d.as_mut() {
        Some(w) => {
            let _ = w.write_all(line.as_bytes()).and_then(|_| w.write_all(b"\n")).and_then(|_| w.flush());
        }
        None => tracing::warn!("dead letter: {line}"),
    }
}
