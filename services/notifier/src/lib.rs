//! The notifier service: consumes match records from the matches topic and
//! delivers each to its rule's targets through [`cepheid_notify::Notifier`].
//!
//! Matches are consumed at least once: offsets are committed only after the
//! alerts of every record before them were delivered or dead-lettered, and a
//! record seen again is dropped by its `match_id`. The action comes from the
//! rule version that produced the match (the rule store keeps history).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cepheid_bus::Bus;
use cepheid_notify::{Notifier, NotifierConfig, NotifierDeps, Sleeper};
use cepheid_rules::RuleSpec;
use cepheid_state::rules::RedisRuleStore;
use cepheid_telemetry::{Kind, Telemetry, Traced, TRACEPARENT};
use cepheid_types::{Clock, MatchRecord};
use serde::Deserialize;

/// The `[notifier_service]` configuration section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Topic the matcher shards write match records to.
    #[serde(default = "matches_topic")]
    pub matches_topic: String,
    #[serde(default = "matches_partitions")]
    pub matches_partitions: i32,
    /// Consumer group of the notifier replicas.
    #[serde(default = "group")]
    pub group: String,
    /// Commit at most this many records at once.
    #[serde(default = "batch")]
    pub batch: usize,
    /// How often delayed alerts are checked (ms).
    #[serde(default = "poll")]
    pub delay_poll_ms: u64,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[serde(default = "listen")]
    pub listen: String,
}

fn listen() -> String {
    "0.0.0.0:9102".into()
}

fn matches_topic() -> String {
    "cepheid.matches".into()
}
fn matches_partitions() -> i32 {
    8
}
fn group() -> String {
    "cepheid-notifier".into()
}
fn batch() -> usize {
    256
}
fn poll() -> u64 {
    1_000
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            matches_topic: matches_topic(),
            matches_partitions: matches_partitions(),
            group: group(),
            batch: batch(),
            delay_poll_ms: poll(),
            listen: listen(),
        }
    }
}

/// Prometheus text of the notifier's delivery counters.
pub fn prometheus(m: &cepheid_notify::Metrics) -> String {
    let mut out = String::new();
    /// Name, type, help, and the counter's value of a target.
    type Series = (&'static str, &'static str, &'static str, fn(&cepheid_notify::TargetMetrics) -> u64);
    let series: [Series; 8] = [
        ("cepheid_notifier_sent_total", "counter", "Alerts delivered, per target.", |t| t.sent),
        ("cepheid_notifier_retried_total", "counter", "Attempts that failed and were retried, per target.", |t| t.retried),
        ("cepheid_notifier_failed_total", "counter", "Alerts that failed for good (then dead-lettered), per target.", |t| t.failed),
        ("cepheid_notifier_dead_lettered_total", "counter", "Alerts written to the dead-letter output, per target.", |t| t.dead_lettered),
        ("cepheid_notifier_deduplicated_total", "counter", "Alerts dropped as duplicates (match id or dedupe window), per target.", |t| t.deduplicated),
        ("cepheid_notifier_attempts_total", "counter", "Delivery attempts, per target.", |t| t.attempts),
        ("cepheid_notifier_delivery_latency_ms_sum", "counter", "Time spent in delivery attempts (ms), per target; divide by attempts for the mean.", |t| t.latency_ms_sum),
        ("cepheid_notifier_delivery_latency_ms_max", "gauge", "Slowest delivery attempt (ms), per target.", |t| t.latency_ms_max),
    ];
    for (name, kind, help, get) in series {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (target, tm) in m {
            out.push_str(&format!("{name}{{target=\"{target}\"}} {}\n", get(tm)));
        }
    }
    out
}

fn http(n: Notifier, bus: Bus, topic: String, lag: Arc<std::sync::atomic::AtomicU64>, read: Arc<std::sync::atomic::AtomicU64>, holes: Arc<std::sync::atomic::AtomicU64>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let (bus, topic) = (bus.clone(), topic.clone());
                async move {
                    match bus.partitions(&topic).await {
                        Ok(_) => (axum::http::StatusCode::OK, "ready"),
                        Err(_) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "matches topic unreachable"),
                    }
                }
            }),
        )
        .route("/metrics", get(move || {
            let n = n.clone();
            let lag = lag.load(std::sync::atomic::Ordering::Relaxed);
            let read = read.load(std::sync::atomic::Ordering::Relaxed);
            let holes = holes.load(std::sync::atomic::Ordering::Relaxed);
            async move {
                let mut text = prometheus(&n.metrics());
                text.push_str(&format!(
                    "# HELP cepheid_notifier_consumer_lag Match records of the assigned partitions after the committed offsets.\n# TYPE cepheid_notifier_consumer_lag gauge\ncepheid_notifier_consumer_lag {lag}\n"
                ));
                text.push_str(&format!(
                    "# HELP cepheid_notifier_records_total Records read from the matches topic (a record read again after a reassignment counts again).\n# TYPE cepheid_notifier_records_total counter\ncepheid_notifier_records_total {read}\n"
                ));
                text.push_str(&format!(
                    "# HELP cepheid_notifier_holes_read_again_total Times the matches partition was read again for a hole in its offsets (0 on Kafka).\n# TYPE cepheid_notifier_holes_read_again_total counter\ncepheid_notifier_holes_read_again_total {holes}\n"
                ));
                text
            }
        }))
}

/// Everything the service talks to.
pub struct Deps {
    pub bus: Bus,
    pub rules: RedisRuleStore,
    /// Where delivered ids, dedupe windows and delayed alerts live.
    pub store: cepheid_notify::stores::Store,
    pub clock: Arc<dyn Clock>,
    pub sleeper: Arc<dyn Sleeper>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served, if anywhere.
    pub http: Option<tokio::net::TcpListener>,
    /// Traces (continued from the match records that carry one).
    pub telemetry: Arc<Telemetry>,
}

/// Counters of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub records: u64,
    pub submitted: u64,
    /// Records whose rule (version) is not in the store, or that do not parse.
    pub skipped: u64,
}

/// Runs until `shutdown` completes; then finishes in-flight deliveries and
/// commits.
pub async fn run(service: ServiceConfig, notifier: NotifierConfig, deps: Deps, shutdown: impl Future<Output = ()>) -> anyhow::Result<Report> {
    deps.bus.create_topic(&service.matches_topic, service.matches_partitions).await.context("creating the matches topic")?;
    let n = Notifier::start(
        notifier,
        NotifierDeps { clock: deps.clock.clone(), sleeper: deps.sleeper.clone(), store: deps.store.clone(), seed: std::process::id() as u64, bus: Some(deps.bus.clone()) },
    )
    .await?;
    // Only shards write the matches topic: a hole in its offsets is records not readable yet.
    let mut consumer = deps.bus.subscribe(&service.group, &[&service.matches_topic])?.contiguous();
    let lag: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let read: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let holes: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let server = deps.http.map(|l| {
        let app = http(n.clone(), deps.bus.clone(), service.matches_topic.clone(), lag.clone(), read.clone(), holes.clone());
        tokio::spawn(async move { axum::serve(l, app).await })
    });
    let mut rules: HashMap<(String, u64), Option<RuleSpec>> = HashMap::new();
    let mut report = Report::default();
    // Submissions spawned since the last commit.
    let mut submitting: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    // Offsets to commit once the deliveries before them are done.
    let mut uncommitted: HashMap<i32, i64> = HashMap::new();
    let mut since_commit = 0usize;
    let mut poll = tokio::time::interval(Duration::from_millis(service.delay_poll_ms.max(10)));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = poll.tick() => {
                if let Some(a) = consumer.assignment_changed() {
                    // Records after the last commit come again after a reassignment (dropped as duplicates).
                    tracing::info!("notifier: assigned {a:?}");
                }
                lag.store(consumer.lag().unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
                holes.store(consumer.holes_read_again(), std::sync::atomic::Ordering::Relaxed);
                n.poll_delayed().await.ok();
                if !uncommitted.is_empty() {
                    commit(&n, &consumer, &service.matches_topic, &mut uncommitted, &mut submitting).await;
                    since_commit = 0;
                }
            }
            m = consumer.recv() => {
                let m = match m {
                    Ok(m) => m,
                    Err(e) if e.is_transient() => {
                        tracing::warn!("notifier: bus: {e}; retrying");
                        deps.sleeper.sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                uncommitted.insert(m.partition, m.offset + 1);
                let record = std::str::from_utf8(&m.payload).ok().and_then(|s| MatchRecord::from_json_line(s).ok());
                match record {
                    Some(r) => {
                        let key = (r.rule_id.clone(), r.rule_version);
                        if !rules.contains_key(&key) {
                            let spec = cepheid_state::retrying("notifier: reading a match's rule", || deps.rules.get_version(&r.rule_id, r.rule_version)).await?;
                            rules.insert(key.clone(), spec);
                        }
                        match rules.get(&key).and_then(|s| s.as_ref()) {
                            Some(spec) => match &spec.action {
                                Some(action) if !action.targets.is_empty() => {
                                    // Concurrently: a slow enrichment source must not hold up
                                    // the next matches. Commits wait for it (`idle`). A target
                                    // this notifier lacks is dead-lettered by `submit`.
                                    let (n2, name, action) = (n.clone(), spec.name.clone(), action.clone());
                                    let sleeper = deps.sleeper.clone();
                                    let span = deps.telemetry.continue_trace("notifier.deliver", Kind::Consumer, m.header(TRACEPARENT));
                                    if let Some(sp) = &span {
                                        sp.attribute("cepheid.match_id", r.match_id.clone());
                                        sp.attribute("cepheid.rule_id", r.rule_id.clone());
                                        sp.attribute("cepheid.targets", action.targets.join(","));
                                    }
                                    submitting.push(tokio::spawn(async move {
                                        let trace_id = span.as_ref().map(Traced::trace_id);
                                        // Redis down (dedupe window, delay queue): wait for it, or the
                                        // match would be lost when its offset is committed.
                                        let mut backoff = cepheid_state::Backoff::default();
                                        loop {
                                            match n2.submit(&r, &name, &action).await {
                                                Err(e) if e.is_transient() => {
                                                    let wait = backoff.next_wait();
                                                    tracing::warn!(match_id = %r.match_id, trace_id, "notifier: {e}; retrying in {} ms", wait.as_millis());
                                                    sleeper.sleep(wait).await;
                                                }
                                                Err(e) => {
                                                    if let Some(sp) = &span {
                                                        sp.error(e.to_string());
                                                    }
                                                    tracing::error!(match_id = %r.match_id, trace_id, "notifier: match not delivered: {e}");
                                                    // Its offset will be committed: keep the match.
                                                    n2.dead_letter_match(&r, "*", &format!("rule `{}`: {e}", r.rule_id));
                                                    break;
                                                }
                                                Ok(_) => break,
                                            }
                                        }
                                    }));
                                    report.submitted += 1;
                                }
                                _ => {}
                            },
                            None => {
                                report.skipped += 1;
                                n.dead_letter_match(&r, "*", &format!("rule `{}` version {} is not in the rule store (deleted?)", r.rule_id, r.rule_version));
                            }
                        }
                    }
                    None => {
                        report.skipped += 1;
                        tracing::warn!("notifier: record {}/{} is not a match record", m.partition, m.offset);
                    }
                }
                since_commit += 1;
                if since_commit >= service.batch {
                    commit(&n, &consumer, &service.matches_topic, &mut uncommitted, &mut submitting).await;
                    since_commit = 0;
                }
            }
        }
    }
    commit(&n, &consumer, &service.matches_topic, &mut uncommitted, &mut submitting).await;
    deps.telemetry.flush();
    if let Some(s) = server {
        s.abort();
    }
    report.records = read.load(std::sync::atomic::Ordering::Relaxed);
    Ok(report)
}

async fn commit(n: &Notifier, c: &cepheid_bus::Consumer, topic: &str, offsets: &mut HashMap<i32, i64>, submitting: &mut Vec<tokio::task::JoinHandle<()>>) {
    // Every spawned submission has reached the target queues, then all of it is delivered.
    for h in submitting.drain(..) {
        let _ = h.await;
    }
    n.idle().await;
    for (p, o) in offsets.drain() {
        if let Err(e) = c.commit(topic, p, o) {
            tracing::warn!("notifier: commit {topic}/{p}@{o}: {e}");
        }
    }
}
