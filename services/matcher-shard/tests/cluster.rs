//! The whole cluster in-process — ingest, keygen-router, matcher shards and
//! notifier over a bus, with the real Redis for rules, checkpoints and
//! delivered ids — against `cepheid run` on the same input and rules.
//!
//! Every scenario posts the committed sample clickstream (plus one closing
//! event far in the future, so every window and absence of the sample is
//! decided by the watermark in both runs) to ingest over HTTP, and compares
//! the alerts the notifier delivered to its JSON-lines file with the match
//! records of the embedded pipeline: same records (all fields but
//! `detected_at`), each exactly once.
//!
//! On the in-memory bus always; on Kafka too when `CEPHEID_KAFKA_BOOTSTRAP`
//! names a broker (`.ci/run` starts one).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cepheid_bus::Bus;
use cepheid_engine::engine::{EngineConfig, ManualClock};
use cepheid_matcher_shard::ShardConfig;
use cepheid_notify::config::TargetConfig;
use cepheid_notify::{NotifierConfig, TokioSleeper};
use cepheid_rules::RuleSpec;
use cepheid_state::rules::RedisRuleStore;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const REDIS: &str = "redis://127.0.0.1:6379";
const CLOSING: &str = r#"{"eventType":"end_of_input","productId":0,"userId":0,"userSession":"-","price":0,"eventTime":4102444800000}"#;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn input() -> Vec<String> {
    let f = std::fs::File::open(root().join("samples/clickstream.jsonl")).unwrap();
    let mut lines: Vec<String> = BufReader::new(f).lines().map(Result::unwrap).collect();
    lines.push(CLOSING.to_string());
    lines
}

/// The example rules, delivering to the test's file target.
fn rules() -> Vec<RuleSpec> {
    let dir = root().join("rules/examples");
    cepheid_cli::rulesdir::rule_files(&dir)
        .unwrap()
        .into_iter()
        .map(|p| {
            let r = cepheid_cli::rulesdir::read_rule_file(&p).unwrap();
            edited(&r, |doc| doc["action"] = serde_json::json!({"targets": ["file:alerts"]}))
        })
        .collect()
}

/// The rule with its document edited (the document is what the store keeps).
fn edited(r: &RuleSpec, f: impl FnOnce(&mut Value)) -> RuleSpec {
    let mut doc = r.document.clone();
    f(&mut doc);
    cepheid_rules::parse_rule_value(&doc).unwrap()
}

/// A record as compared: every field but `detected_at`.
fn comparable(mut v: Value) -> String {
    v.as_object_mut().unwrap().remove("detected_at");
    v.to_string()
}

/// `cepheid run` over the same input (the embedded pipeline, in-process).
fn embedded_alerts(lines: &[String]) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let settings = cepheid_cli::settings::Settings::load(None).unwrap();
    let out = tmp.path().join("alerts.jsonl");
    let mut p = cepheid_cli::run::Pipeline::new(
        &settings,
        "clickstream",
        &root().join("rules/examples"),
        Arc::new(ManualClock::new(0)),
        Box::new(std::fs::File::create(&out).unwrap()),
        tmp.path().join("late.jsonl"),
        tmp.path().join("rejected.jsonl"),
        Box::new(std::io::sink()),
    )
    .unwrap();
    for (i, l) in lines.iter().enumerate() {
        p.line("input", i as u64 + 1, l).unwrap();
    }
    p.finish().unwrap();
    drop(p);
    let mut v: Vec<String> =
        std::fs::read_to_string(out).unwrap().lines().map(|l| comparable(serde_json::from_str(l).unwrap())).collect();
    v.sort();
    v
}

struct Svc {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<()>,
}

impl Svc {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.handle.await;
    }
    /// No clean shutdown: the task is dropped where it stands.
    async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

fn spawn<F>(f: impl FnOnce(oneshot::Receiver<()>) -> F) -> Svc
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    Svc { stop: Some(tx), handle: tokio::spawn(f(rx)) }
}

struct Cluster {
    bus: Bus,
    redis: String,
    otlp: Option<String>,
    tag: String,
    prefix: String,
    store: RedisRuleStore,
    alerts: PathBuf,
    _tmp: tempfile::TempDir,
    ingest_cfg: cepheid_ingest::IngestConfig,
    ingest_url: String,
    ingest: Option<Svc>,
    /// The raw topic ingest reads (when the cluster was started with one).
    raw_topic: String,
    /// Where each service serves /healthz, /readyz and /metrics.
    probes: Vec<(String, String)>,
    services: Vec<Svc>,
    router: Option<Svc>,
    shards: Vec<Svc>,
    /// Why shards stopped on an error (one line each).
    shard_errors: Arc<std::sync::Mutex<Vec<String>>>,

    events_topic: String,
    keyed_topic: String,
    matches_topic: String,
    dead_topic: String,
}

/// A service's tracing: every event traced when an OTLP endpoint is given, none otherwise.
fn telemetry(otlp: &Option<String>, service: &str) -> Arc<cepheid_telemetry::Telemetry> {
    let s = cepheid_telemetry::TelemetrySettings { otlp_endpoint: otlp.clone(), sample_ratio: 1.0, export_interval_ms: 50, ..Default::default() };
    Arc::new(cepheid_telemetry::Telemetry::new(service, &s).unwrap())
}

/// How a test's cluster differs from the usual one.
struct Opts {
    shards: usize,
    redis: String,
    /// OTLP endpoint every service exports traces to (every event traced).
    otlp: Option<String>,
    rules: Vec<RuleSpec>,
    /// Ingest also reads a raw topic (see [`Cluster::produce_raw`]).
    raw: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { shards: 2, redis: REDIS.into(), otlp: None, rules: rules(), raw: false }
    }
}

impl Cluster {
    async fn start(bus: Bus, tag: &str, shards: usize) -> Cluster {
        Cluster::start_with(bus, tag, Opts { shards, ..Opts::default() }).await
    }

    async fn start_with(bus: Bus, tag: &str, opts: Opts) -> Cluster {
        let redis = opts.redis.as_str();
        // `CEPHEID_TEST_LOG` (a tracing filter, e.g. `warn,cepheid_bus=info`) to see more.
        let filter = std::env::var("CEPHEID_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter(filter).try_init();
        let tag = format!("{tag}-{}", std::process::id());
        let prefix = format!("cepheid-test:cluster-{tag}");
        cepheid_state::delete_prefix(redis, &prefix).await.unwrap();
        let store = RedisRuleStore::connect(redis, &prefix).await.unwrap();
        for r in &opts.rules {
            store.apply(r).await.unwrap();
        }
        let telemetry = |service: &str| telemetry(&opts.otlp, service);
        let tmp = tempfile::tempdir().unwrap();
        let alerts = tmp.path().join("alerts.jsonl");
        let (events_topic, keyed_topic, matches_topic, dead_topic) =
            (format!("events-{tag}"), format!("keyed-{tag}"), format!("matches-{tag}"), format!("dead-{tag}"));

        // One events partition, created before any service could create it with another count.
        bus.create_topic(&events_topic, 1).await.unwrap();
        let mut services = Vec::new();
        // ingest: one events partition, so the router reads events in the order posted
        // (exact equality with one input file needs that, or partitioning by a field every rule keys by).
        let mut icfg: cepheid_ingest::IngestConfig = cepheid_runtime::load::<IngestOnly>(None).unwrap().ingest;
        icfg.events_topic = events_topic.clone();
        icfg.events_partitions = 1;
        // The input ends with an event in 2100 that closes every window (the
        // cluster has no end of input): no limit on how far ahead of the clock.
        for schema in icfg.schemas.values_mut().chain([&mut icfg.default_schema]) {
            schema.max_ahead_ms = 0;
        }
        icfg.dead_letter_topic = dead_topic.clone();
        icfg.group = format!("ingest-{tag}");
        // A raw topic of one partition (the input's order kept), read as the clickstream.
        let raw_topic = format!("raw-{tag}");
        if opts.raw {
            bus.create_topic(&raw_topic, 1).await.unwrap();
            icfg.raw_topics.insert(raw_topic.clone(), "clickstream".into());
        }
        let probes = Vec::new();
        // notifier
        let mut ncfg = NotifierConfig::default();
        ncfg.targets.insert("alerts".into(), TargetConfig::File { path: alerts.clone() });
        let scfg = cepheid_notifier::ServiceConfig {
            matches_topic: matches_topic.clone(),
            group: format!("notifier-{tag}"),
            matches_partitions: 2,
            delay_poll_ms: 50,
            ..Default::default()
        };
        let nstore = cepheid_notify::stores::Store::redis(redis, &prefix).await.unwrap();
        let mut probes = probes;
        let deps = cepheid_notifier::Deps {
            bus: bus.clone(),
            rules: store.clone(),
            store: nstore,
            clock: Arc::new(cepheid_types::SystemClock),
            sleeper: Arc::new(TokioSleeper),
            http: Some({
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                probes.push(("notifier".into(), format!("http://{}", l.local_addr().unwrap())));
                l
            }),
            telemetry: telemetry("cepheid-notifier"),
        };
        services.push(spawn(move |stop| async move {
            cepheid_notifier::run(scfg, ncfg, deps, async move {
                let _ = stop.await;
            })
            .await
            .unwrap();
        }));
        let mut c = Cluster {
            bus,
            redis: redis.to_string(),
            otlp: opts.otlp.clone(),
            tag,
            prefix,
            store,
            alerts,
            _tmp: tmp,
            ingest_cfg: icfg,
            ingest_url: String::new(),
            ingest: None,
            raw_topic,
            probes,
            services,
            router: None,
            shards: Vec::new(),
            shard_errors: Arc::default(),

            events_topic,
            keyed_topic,
            matches_topic,
            dead_topic,
        };
        c.start_ingest(c.ingest_cfg.group.clone()).await;
        c.start_router(c.router_group()).await;
        for _ in 0..opts.shards {
            c.add_shard().await;
        }
        c
    }

    /// Starts ingest, reading raw topics in consumer group `group`, on a port of its own.
    async fn start_ingest(&mut self, group: String) {
        let cfg = cepheid_ingest::IngestConfig { group, ..self.ingest_cfg.clone() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.ingest_url = format!("http://{}", listener.local_addr().unwrap());
        self.probes.retain(|(name, _)| name != "ingest");
        self.probes.push(("ingest".into(), self.ingest_url.clone()));
        let (b, t) = (self.bus.clone(), telemetry(&self.otlp, "cepheid-ingest"));
        // Posts carry an `Idempotency-Key` (see `post`): remembered in the test's Redis prefix.
        let ledger = cepheid_ingest::ledger::PostLedger::redis(&self.redis, &self.prefix, cfg.idempotency_ttl_ms, cfg.idempotency_lock_ms).unwrap();
        self.ingest = Some(spawn(move |stop| async move {
            cepheid_ingest::run(cfg, b, t, listener, ledger, async move {
                let _ = stop.await;
            })
            .await
            .unwrap();
        }));
    }

    /// Writes lines to the raw topic, one record each, in order.
    async fn produce_raw(&self, lines: &[String]) {
        let mut acks = Vec::with_capacity(lines.len());
        for l in lines {
            acks.push(self.bus.enqueue(&self.raw_topic, Some(0), None, l.as_bytes(), &[]).await.unwrap());
        }
        for a in acks {
            a.await.unwrap();
        }
    }

    /// Starts the keygen-router in consumer group `group` (`r1`; a successor
    /// has the same id, as a restarted container has the same host name and pid).
    async fn start_router(&mut self, group: String) {
        let rcfg = cepheid_keygen_router::RouterConfig {
            events_topic: self.events_topic.clone(),
            keyed_topic: self.keyed_topic.clone(),
            keyed_partitions: 4,
            group,
            router_id: Some("r1".into()),
            watermark_interval_ms: 20,
            listen: "127.0.0.1:0".into(),
            dead_letter_topic: self.dead_topic.clone(),
            idle_partition_ms: 5_000,
            // Small frames: many of them, also sent in the middle of an ingest frame.
            frame_max_events: 7,
            ..Default::default()
        };
        let (b, s, t) = (self.bus.clone(), self.store.clone(), telemetry(&self.otlp, "cepheid-keygen-router"));
        let rl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.probes.retain(|(name, _)| name != "keygen-router");
        self.probes.push(("keygen-router".into(), format!("http://{}", rl.local_addr().unwrap())));
        self.router = Some(spawn(move |stop| async move {
            cepheid_keygen_router::run(rcfg, engine(), b, s, t, Some(rl), async move {
                let _ = stop.await;
            })
            .await
            .unwrap();
        }));
    }

    fn router_group(&self) -> String {
        format!("router-{}", self.tag)
    }

    fn shard_config(&self) -> ShardConfig {
        ShardConfig {
            keyed_topic: self.keyed_topic.clone(),
            keyed_partitions: 4,
            matches_topic: self.matches_topic.clone(),
            matches_partitions: 2,
            dead_letter_topic: self.dead_topic.clone(),
            group: format!("shard-{}", self.tag),
            checkpoint_interval_ms: 30,
            checkpoint_records: 300,
            // Every idle key is passivated at each checkpoint: restores are exercised throughout.
            passivate_after_ms: 0,
            // (Every idle key goes at each checkpoint anyway.)
            max_running_keys: 0,
            redis_timeout_ms: ShardConfig::default().redis_timeout_ms,
            router_expiry_ms: 60_000,
            release_interval_ms: 20,
            // One snapshot request at a time: keys step while their checkpoint
            // is still asking (each must be asked before it steps).
            snapshot_batch: 1,
            listen: "127.0.0.1:0".into(),
            // The binary's runtime; here shards run on the test's.
            threads: 1,
        }
    }

    async fn add_shard(&mut self) {
        self.add_shard_on(self.bus.clone()).await
    }

    /// A shard with a bus client of its own (other client settings).
    async fn add_shard_on(&mut self, bus: Bus) {
        let cfg = self.shard_config();
        let deps = cepheid_matcher_shard::Deps {
            bus,
            rules: self.store.clone(),
            redis_url: self.redis.clone(),
            prefix: self.prefix.clone(),
            clock: Arc::new(cepheid_types::SystemClock),
            telemetry: telemetry(&self.otlp, "cepheid-matcher-shard"),
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.probes.push((format!("matcher-shard-{}", self.shards.len() + 1), format!("http://{}", l.local_addr().unwrap())));
        let errors = self.shard_errors.clone();
        self.shards.push(spawn(move |stop| async move {
            let r = cepheid_matcher_shard::run(cfg, engine(), deps, Some(l), async move {
                let _ = stop.await;
            })
            .await;
            if let Err(e) = r {
                eprintln!("matcher-shard stopped: {e:#}");
                errors.lock().unwrap().push(format!("{e:#}"));
            }
        }));
    }

    /// Posts lines to ingest in batches, each under an `Idempotency-Key` of
    /// its own (as a careful client sends them: the keyed path end to end);
    /// returns (accepted, rejected).
    async fn post(&self, lines: &[String]) -> (u64, u64) {
        self.post_with(lines, true).await
    }

    /// Posts lines in batches, under keys or not (ingest then needs no Redis).
    async fn post_with(&self, lines: &[String], keyed: bool) -> (u64, u64) {
        let http = reqwest::Client::new();
        loop {
            if http.get(format!("{}/readyz", self.ingest_url)).send().await.is_ok_and(|r| r.status() == 200) {
                break;
            }
            tokio::task::yield_now().await;
        }
        let (mut accepted, mut rejected) = (0, 0);
        static POSTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        for chunk in lines.chunks(400) {
            let body = chunk.join("\n");
            let key = keyed.then(|| format!("{}-post-{}", self.prefix, POSTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let (status, v) = loop {
                let mut req = http.post(format!("{}/v1/events?source=clickstream", self.ingest_url)).body(body.clone());
                if let Some(k) = &key {
                    req = req.header("Idempotency-Key", k);
                }
                let r = req.send().await.unwrap();
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                // Under a key a 503 is safe to send again (e.g. ingest's Redis
                // connection coming back after an outage): what was stored is not stored again.
                if key.is_some() && status == 503 && tokio::time::Instant::now() < deadline {
                    tokio::task::yield_now().await;
                    continue;
                }
                break (status, v);
            };
            assert!(status == 202 || status == 400, "ingest answered {status}: {v}");
            accepted += v["accepted"].as_u64().unwrap();
            rejected += v["rejected"].as_array().unwrap().len() as u64;
        }
        (accepted, rejected)
    }

    /// Alerts in the notifier's file: complete lines only (the notifier may be
    /// writing the next one while it is read).
    fn delivered(&self) -> Vec<Value> {
        match std::fs::read_to_string(&self.alerts) {
            Ok(s) => {
                let complete = &s[..s.rfind('\n').map_or(0, |i| i + 1)];
                complete.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["match"].clone()).collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Waits until at least `n` alerts were delivered (bounded: a hang fails the test).
    async fn until_delivered(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while self.delivered().len() < n {
            if tokio::time::Instant::now() >= deadline {
                let mut per_rule: BTreeMap<String, usize> = BTreeMap::new();
                for a in self.delivered() {
                    *per_rule.entry(a["rule_id"].as_str().unwrap_or_default().to_string()).or_default() += 1;
                }
                let mut metrics = String::new();
                for (name, url) in &self.probes {
                    if let Ok(r) = reqwest::get(format!("{url}/metrics")).await {
                        let text = r.text().await.unwrap_or_default();
                        metrics.push_str(&format!("{name}: {}\n", text.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join(", ")));
                    }
                }
                panic!("only {} of {n} alerts delivered; per rule: {per_rule:?}\n{metrics}", self.delivered().len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every record of `topic` so far: each of its partitions read up to its
    /// high watermark, by a reader group of its own (`reader`).
    async fn read_all(&self, topic: &str, reader: &str) -> Vec<cepheid_bus::Message> {
        let mut c = self.bus.subscribe(&format!("{reader}-{}", self.tag), &[topic]).unwrap();
        let mut left = BTreeMap::new();
        for p in 0..self.bus.partitions(topic).await.unwrap() {
            let (low, high) = c.bounds(topic, p).await.unwrap();
            if high > low {
                left.insert(p, high - 1);
            }
        }
        let mut got = Vec::new();
        while !left.is_empty() {
            let m = tokio::time::timeout(Duration::from_secs(60), c.recv()).await.unwrap_or_else(|_| panic!("{topic} read")).unwrap();
            if left.get(&m.partition).is_some_and(|last| m.offset >= *last) {
                left.remove(&m.partition);
            }
            got.push(m);
        }
        got
    }

    /// Per (rule, key) of the match records in the matches topic: the partitions they are in.
    async fn match_partitions_by_key(&self) -> BTreeMap<(String, String), BTreeSet<i32>> {
        let mut by_key: BTreeMap<(String, String), BTreeSet<i32>> = BTreeMap::new();
        for m in self.read_all(&self.matches_topic, "reader").await {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            by_key.entry((v["rule_id"].as_str().unwrap().to_string(), v["key"].to_string())).or_default().insert(m.partition);
        }
        by_key
    }

    /// Waits (at most a minute) until counter `name`, summed over the services
    /// whose probe name starts with `service`, is above zero; returns it.
    async fn until_counted(&self, service: &str, name: &str) -> f64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut sum = 0.0;
            for (_, url) in self.probes.iter().filter(|(n, _)| n.starts_with(service)) {
                sum += counter(url, name).await;
            }
            if sum > 0.0 {
                return sum;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name} of {service} stayed at 0");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The reasons of every record in the dead-letter topic so far.
    async fn dead_letter_reasons(&self) -> Vec<String> {
        let dead = self.read_all(&self.dead_topic, "dead-reader").await;
        dead.iter().map(|m| String::from_utf8_lossy(m.header("cepheid-reason").unwrap_or_default()).into_owned()).collect()
    }

    /// Stops everything (shards cleanly) and returns the delivered alerts, comparable and sorted.
    async fn finish(mut self) -> Vec<String> {
        // Ingest and the router first, so that everything they took reaches the shards.
        for s in self.ingest.take().into_iter().chain(self.router.take()).chain(self.services.drain(..)) {
            s.stop().await;
        }
        for s in self.shards.drain(..) {
            s.stop().await;
        }
        let mut v: Vec<String> = self.delivered().into_iter().map(comparable).collect();
        v.sort();
        cepheid_state::delete_prefix(&self.redis, &self.prefix).await.unwrap();
        v
    }
}

#[derive(serde::Deserialize)]
struct IngestOnly {
    ingest: cepheid_ingest::IngestConfig,
}

fn engine() -> EngineConfig {
    cepheid_runtime::load::<EngineOnly>(None).unwrap().engine
}

#[derive(serde::Deserialize)]
struct EngineOnly {
    engine: EngineConfig,
}

/// The Kafka bus `CEPHEID_KAFKA_BOOTSTRAP` names; without one, says so (the
/// test is then skipped).
fn kafka() -> Option<Bus> {
    let Ok(bootstrap) = std::env::var("CEPHEID_KAFKA_BOOTSTRAP") else {
        eprintln!("CEPHEID_KAFKA_BOOTSTRAP is not set; run through .ci/run (which starts a broker) to include Kafka");
        return None;
    };
    Some(Bus::kafka(&cepheid_bus::KafkaConfig { bootstrap, properties: vec![] }).unwrap())
}

fn assert_same(got: &[String], want: &[String]) {
    let count = |v: &[String]| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for x in v {
            *m.entry(x.clone()).or_default() += 1;
        }
        m
    };
    let (g, w) = (count(got), count(want));
    let missing: Vec<&String> = w.keys().filter(|k| g.get(*k) != w.get(*k)).take(3).collect();
    let extra: Vec<&String> = g.keys().filter(|k| !w.contains_key(*k)).take(3).collect();
    assert!(
        got == want,
        "cluster delivered {} alerts, cepheid run gives {}; differing (first 3): {missing:?}; extra: {extra:?}",
        got.len(),
        want.len()
    );
}

async fn end_to_end(bus: Bus, tag: &str) {
    let lines = input();
    let want = embedded_alerts(&lines);
    assert!(want.len() > 50, "the sample gives alerts");
    let mut per_rule: BTreeMap<String, usize> = BTreeMap::new();
    for a in &want {
        let v: Value = serde_json::from_str(a).unwrap();
        *per_rule.entry(v["rule_id"].as_str().unwrap().to_string()).or_default() += 1;
    }
    eprintln!("cepheid run: {per_rule:?}");
    let c = Cluster::start(bus, tag, 2).await;
    let (accepted, rejected) = c.post(&lines).await;
    assert_eq!((accepted as usize, rejected), (lines.len() - 2, 2), "the sample's two malformed lines are refused");
    c.until_delivered(want.len()).await;
    // A shard sends the matches of a keyed partition to one matches partition
    // (a release is one batch for the broker): a key's matches stay together.
    let by_key = c.match_partitions_by_key().await;
    let spread: Vec<_> = by_key.iter().filter(|(_, ps)| ps.len() > 1).collect();
    assert!(spread.is_empty(), "matches of one key in several partitions: {spread:?}");
    let used: BTreeSet<i32> = by_key.values().flatten().copied().collect();
    assert_eq!(used.len() as i32, c.bus.partitions(&c.matches_topic).await.unwrap(), "every matches partition carries matches");
    let got = c.finish().await;
    assert_same(&got, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_equals_cepheid_run_on_the_memory_bus() {
    end_to_end(Bus::memory(), "e2e-mem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_equals_cepheid_run_on_kafka() {
    let Some(bus) = kafka() else { return };
    end_to_end(bus, "e2e-kafka").await;
}

/// A shard killed without a clean shutdown mid-stream, then started again:
/// the other shard takes its partitions from the checkpoints, the new one
/// takes some back; the alerts are the same, each delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_killed_and_restarted_loses_and_repeats_nothing() {
    let lines = input();
    let want = embedded_alerts(&lines);
    let mut c = Cluster::start(Bus::memory(), "kill", 2).await;
    let half = lines.len() / 2;
    c.post(&lines[..half]).await;
    c.until_delivered(want.len() / 4).await;
    let victim = c.shards.remove(0);
    victim.kill().await;
    c.post(&lines[half..half + 2000]).await;
    c.add_shard().await;
    c.post(&lines[half + 2000..]).await;
    c.until_delivered(want.len()).await;
    let got = c.finish().await;
    assert_same(&got, &want);
}

/// The keygen-router killed mid-stream, and its successor reading the events
/// topic again from further back than what the killed one had sent (as after
/// a crash between its frames' acknowledgement and the commit of their
/// events; here the successor reads from the topic's start, in a consumer
/// group of its own — the one way to have that crash at a known point): the
/// shards take each event once, nothing is dead-lettered as late, and the
/// alerts are those of `cepheid run`, each once.
async fn router_killed_and_reading_again(bus: Bus, tag: &str) {
    let lines = input();
    let want = embedded_alerts(&lines);
    let mut c = Cluster::start(bus, tag, 2).await;
    let half = lines.len() / 2;
    c.post(&lines[..half]).await;
    c.until_delivered(want.len() / 4).await;
    c.router.take().unwrap().kill().await;
    c.start_router(format!("{}-successor", c.router_group())).await;
    c.post(&lines[half..]).await;
    c.until_delivered(want.len()).await;
    let dropped = c.until_counted("matcher-shard", "cepheid_shard_duplicates_total").await;
    eprintln!("repeats dropped: {dropped}");
    let late = c.dead_letter_reasons().await.into_iter().filter(|r| r.starts_with("late at the shard")).count();
    assert_eq!(late, 0, "events sent again were dead-lettered as late instead of dropped as repeats");
    let got = c.finish().await;
    assert_same(&got, &want);
}

/// Ingest forwarding a raw topic is killed mid-stream (aborted: nothing
/// committed on the way out) and a successor reads the raw topic again from
/// its start (a consumer group of its own: every record forwarded before is
/// forwarded again, at new events offsets): the alerts are those of `cepheid
/// run`, no event is taken twice or dead-lettered as late — the router drops
/// the raw positions it routed before.
async fn ingest_killed_and_forwarding_again(bus: Bus, tag: &str) {
    let lines = input();
    let want = embedded_alerts(&lines);
    let mut c = Cluster::start_with(bus, tag, Opts { raw: true, ..Opts::default() }).await;
    let half = lines.len() / 2;
    c.produce_raw(&lines[..half]).await;
    c.until_delivered(want.len() / 4).await;
    c.ingest.take().unwrap().kill().await;
    c.start_ingest(format!("{}-successor", c.ingest_cfg.group)).await;
    c.produce_raw(&lines[half..]).await;
    c.until_delivered(want.len()).await;
    let dropped = c.until_counted("keygen-router", "cepheid_router_duplicates_total").await;
    eprintln!("repeats dropped by the router: {dropped}");
    // The input's own late events (behind the newest time before them by more
    // than the bound: one events partition, so the router's watermark is that).
    let bound = engine().default_source.out_of_orderness_ms;
    let mut newest = i64::MIN;
    let mut late_in_input = 0;
    for l in &lines {
        // (Lines ingest refuses have none.)
        let Some(t) = serde_json::from_str::<Value>(l).ok().and_then(|v| v["eventTime"].as_i64()) else { continue };
        if t < newest.saturating_sub(bound) {
            late_in_input += 1;
        } else {
            newest = newest.max(t);
        }
    }
    let late: Vec<String> = c.dead_letter_reasons().await.into_iter().filter(|r| r.starts_with("late")).collect();
    assert_eq!(late.len(), late_in_input, "events forwarded again were dead-lettered as late instead of dropped as repeats: {:?}", &late[..late.len().min(5)]);
    let got = c.finish().await;
    assert_same(&got, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_and_forwarding_again_repeats_nothing() {
    ingest_killed_and_forwarding_again(Bus::memory(), "ingest-kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_and_forwarding_again_repeats_nothing_on_kafka() {
    let Some(bus) = kafka() else { return };
    ingest_killed_and_forwarding_again(bus, "ingest-kill-kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_and_reading_again_repeats_nothing() {
    router_killed_and_reading_again(Bus::memory(), "router-kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_and_reading_again_repeats_nothing_on_kafka() {
    let Some(bus) = kafka() else { return };
    router_killed_and_reading_again(bus, "router-kill-kafka").await;
}

/// The broker refuses a shard's match records (its producer may send no
/// record over 1 000 bytes, librdkafka's smallest `message.max.bytes`; the
/// sample's matches are larger): the shard stops with the error and does not
/// checkpoint on its way out (its keys stepped past a match that is not in
/// the matches topic); a shard started in its place replays from the last
/// checkpoint, and every alert is delivered, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_match_records_are_not_checkpointed_past() {
    let Ok(bootstrap) = std::env::var("CEPHEID_KAFKA_BOOTSTRAP") else {
        eprintln!("CEPHEID_KAFKA_BOOTSTRAP is not set; run through .ci/run (which starts a broker) to include Kafka");
        return;
    };
    let bus = |properties: Vec<(String, String)>| Bus::kafka(&cepheid_bus::KafkaConfig { bootstrap: bootstrap.clone(), properties }).unwrap();
    let lines = input();
    let want = embedded_alerts(&lines);
    let mut c = Cluster::start(bus(vec![]), "refused-matches", 0).await;
    c.add_shard_on(bus(vec![("message.max.bytes".into(), "1000".into())])).await;
    let half = lines.len() / 2;
    c.post(&lines[..half]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !c.shards[0].handle.is_finished() {
        assert!(tokio::time::Instant::now() < deadline, "the shard went on although its match records were refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let errors = c.shard_errors.lock().unwrap().clone();
    assert!(errors.iter().any(|e| e.contains("MessageSizeTooLarge")), "the shard stopped for another reason: {errors:?}");
    c.shards.remove(0).stop().await;
    c.add_shard().await;
    c.post(&lines[half..]).await;
    c.until_delivered(want.len()).await;
    let got = c.finish().await;
    assert_same(&got, &want);
}

/// A third shard joins mid-stream: partitions move (checkpoint, hand-over,
/// restore) and the alerts stay the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_from_two_to_three_shards_keeps_the_alerts() {
    let lines = input();
    let want = embedded_alerts(&lines);
    let mut c = Cluster::start(Bus::memory(), "scale", 2).await;
    let third = lines.len() / 3;
    c.post(&lines[..third]).await;
    c.until_delivered(1).await;
    c.add_shard().await;
    c.post(&lines[third..]).await;
    c.until_delivered(want.len()).await;
    let got = c.finish().await;
    assert_same(&got, &want);
}

/// While events flow, one rule is changed (a new version) and one is added:
/// both take effect without a restart, and every other rule's alerts — with
/// the partial matches they held across the change — are exactly those of
/// `cepheid run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_rule_change_and_addition_keep_other_rules_state() {
    let lines = input();
    let want = embedded_alerts(&lines);
    let c = Cluster::start(Bus::memory(), "live", 2).await;
    let half = lines.len() / 2;
    c.post(&lines[..half]).await;
    c.until_delivered(1).await;
    // high_intent as version 2 (a replaced rule's keys start afresh), and a new rule.
    let old = rules().into_iter().find(|r| r.id == "high_intent").unwrap();
    let changed = edited(&old, |doc| doc["version"] = serde_json::json!(old.version + 1));
    c.store.apply(&changed).await.unwrap();
    let added = cepheid_rules::parse_rule_json(
        r#"{"id":"purchase_seen","version":1,"key_by":["userId"],
            "pattern":[{"name":"p","where":"eventType = 'purchase'"}],
            "action":{"targets":["file:alerts"]}}"#,
    )
    .unwrap();
    c.store.apply(&added).await.unwrap();
    c.post(&lines[half..]).await;
    // Wait for the unaffected rules' alerts, then for the new rule's.
    let others: Vec<&String> = want.iter().filter(|a| !a.contains("\"rule_id\":\"high_intent\"")).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let d = c.delivered();
        let n_others = d.iter().filter(|a| a["rule_id"] != "high_intent" && a["rule_id"] != "purchase_seen").count();
        let n_new = d.iter().filter(|a| a["rule_id"] == "purchase_seen").count();
        let n_v2 = d.iter().filter(|a| a["rule_id"] == "high_intent" && a["rule_version"] == changed.version).count();
        if n_others >= others.len() && n_new > 0 && n_v2 > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "others {n_others}/{}, new {n_new}, v2 {n_v2}", others.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = c.finish().await;
    let got_others: Vec<String> =
        got.iter().filter(|a| !a.contains("\"rule_id\":\"high_intent\"") && !a.contains("\"rule_id\":\"purchase_seen\"")).cloned().collect();
    let want_others: Vec<String> = others.into_iter().cloned().collect();
    assert_same(&got_others, &want_others);
    // The new rule fired only on events posted after it was stored.
    let first_new = got.iter().filter(|a| a.contains("\"rule_id\":\"purchase_seen\"")).count();
    assert!(first_new > 0);
}

/// Every service answers its probes and exposes every metric that
/// docs/metrics.md lists for it, in a running cluster that processed the sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_answers_probes_and_metrics() {
    let spec = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in spec.lines().filter(|l| l.starts_with("| ") && l.contains("`cepheid_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        wanted.entry(cells[1].to_string()).or_default().push(cells[2].trim_matches('`').to_string());
    }
    assert_eq!(wanted.keys().cloned().collect::<Vec<_>>(), ["ingest", "keygen-router", "matcher-shard", "notifier"]);
    let lines = input();
    let want = embedded_alerts(&lines);
    let c = Cluster::start(Bus::memory(), "probes", 2).await;
    c.post(&lines).await;
    c.until_delivered(want.len()).await;
    let http = reqwest::Client::new();
    let mut shard_matches = 0.0;
    for (name, url) in &c.probes {
        assert_eq!(http.get(format!("{url}/healthz")).send().await.unwrap().status(), 200, "{name} /healthz");
        let ready = http.get(format!("{url}/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200, "{name} /readyz: {}", ready.text().await.unwrap());
        // Shards publish their counters on their checkpoint tick: wait for a fresh scrape.
        let metrics = loop {
            let m = http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
            if !name.starts_with("matcher-shard") || m.contains("cepheid_shard_rule_matches_total{") {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let service = if name.starts_with("matcher-shard") { "matcher-shard" } else { name.as_str() };
        for metric in &wanted[service] {
            assert!(metrics.lines().any(|l| l.starts_with(metric.as_str())), "{name} does not expose {metric}:\n{metrics}");
        }
        if service == "matcher-shard" {
            let evaluations: f64 = metrics
                .lines()
                .filter(|l| l.starts_with("cepheid_shard_rule_evaluations_total{") || l.starts_with("cepheid_shard_rule_evaluation_seconds_count{"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .sum();
            assert!(evaluations > 0.0, "{name} counted no rule evaluations:\n{metrics}");
            shard_matches += metrics
                .lines()
                .find(|l| l.starts_with("cepheid_shard_matches_total "))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap();
        }
    }
    assert!(shard_matches >= want.len() as f64, "shards counted {shard_matches} matches, {} delivered", want.len());
    c.finish().await;
}

/// A Redis server of the test's own (the machine's is shared by every test),
/// keeping its data on disk so that a restart is a restart, not a wipe.
struct OwnRedis {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut r = OwnRedis { dir: tempfile::tempdir().unwrap(), port, child: None };
        r.up();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package) is on the machine");
        self.child = Some(child);
        // Ready when it answers PING.
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while client.get_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server on {} did not start", self.port);
            std::thread::yield_now();
        }
    }

    /// SIGTERM: Redis writes its data and exits, dropping every connection.
    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill").arg(c.id().to_string()).status();
            c.wait().unwrap();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads one counter from a service's /metrics.
async fn counter(url: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Redis goes down mid-stream while events keep arriving, and comes back:
/// the services wait for it (rule feed resynced, checkpoints retried, the
/// notifier's lookups retried) instead of exiting, and the alerts are still
/// exactly those of `cepheid run`, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_stream_loses_nothing() {
    let lines = input();
    let want = embedded_alerts(&lines);
    let mut redis = OwnRedis::start();
    let c = Cluster::start_with(Bus::memory(), "redis-restart", Opts { redis: redis.url(), ..Opts::default() }).await;
    let third = lines.len() / 3;
    c.post(&lines[..third]).await;
    c.until_delivered(1).await;
    redis.down();
    // Posts without an `Idempotency-Key` do not need Redis.
    c.post_with(&lines[third..2 * third], false).await;
    // Redis stays down until a shard has failed to reach it (a checkpoint, or
    // loading a passivated key's state).
    c.until_counted("matcher-shard", "cepheid_shard_redis_errors_total").await;
    // A post under a key cannot be remembered now: refused whole, nothing stored.
    let body = lines[2 * third..].join("\n");
    let r = reqwest::Client::new()
        .post(format!("{}/v1/events?source=clickstream", c.ingest_url))
        .header("Idempotency-Key", format!("{}-during-outage", c.prefix))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("redis") && v["accepted"] == 0, "{v}");
    redis.up();
    // Sent again once Redis is back: stored.
    c.post(&lines[2 * third..]).await;
    c.until_delivered(want.len()).await;
    let got = c.finish().await;
    assert_same(&got, &want);
}

/// The broker goes away mid-stream (librdkafka's mock cluster: the one fault
/// the real broker here cannot be made to have without losing its data) and
/// comes back: ingest does not answer a batch while the broker cannot take it
/// (back-pressure, not a false 202), every service reconnects by itself, and
/// the alerts are exactly those of `cepheid run`, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_and_back_loses_nothing() {
    let lines = input();
    let want = embedded_alerts(&lines);
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    // The mock broker cannot create topics through the admin API: they are
    // provisioned beforehand, as on a cluster whose services may not create topics.
    let tag = format!("broker-outage-{}", std::process::id());
    for (t, n) in [("events", 1), ("keyed", 4), ("matches", 2), ("dead", 1)] {
        mock.create_topic(&format!("{t}-{tag}"), n, 1).unwrap();
    }
    let bus = Bus::kafka(&cepheid_bus::KafkaConfig { bootstrap: mock.bootstrap_servers(), properties: vec![] }).unwrap();
    let c = Arc::new(Cluster::start(bus, "broker-outage", 2).await);
    let third = lines.len() / 3;
    c.post(&lines[..third]).await;
    c.until_delivered(1).await;
    let ingest = c.ingest_url.clone();
    let accepted_before = counter(&ingest, "cepheid_ingest_events_accepted_total").await;
    mock.broker_down(-1).unwrap();
    let (c2, batch) = (c.clone(), lines[third..2 * third].to_vec());
    let posting = tokio::spawn(async move { c2.post(&batch).await });
    // The batch reached ingest and waits for the broker's acknowledgement; no answer meanwhile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !posting.is_finished() && counter(&ingest, "cepheid_ingest_events_awaiting_ack").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the batch never reached ingest");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!posting.is_finished(), "ingest answered while the broker was down");
    assert_eq!(counter(&ingest, "cepheid_ingest_events_accepted_total").await, accepted_before, "events acknowledged while the broker was down");
    mock.broker_up(-1).unwrap();
    let (accepted, rejected) = posting.await.unwrap();
    assert_eq!((accepted + rejected) as usize, third, "every event of the batch answered once the broker was back");
    c.post(&lines[2 * third..]).await;
    c.until_delivered(want.len()).await;
    let c = Arc::try_unwrap(c).ok().expect("the posting task is done");
    let got = c.finish().await;
    assert_same(&got, &want);
    drop(mock);
}

/// An OTLP/HTTP receiver of the test's own: keeps every exported trace document.
async fn otlp_receiver() -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    let got: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push(serde_json::from_slice::<Value>(&body).expect("OTLP JSON"));
                axum::Json(serde_json::json!({}))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, got)
}

/// (service, trace id, span id, parent span id, span name) of every span received.
fn spans(docs: &[Value]) -> Vec<(String, String, String, String, String)> {
    let mut out = Vec::new();
    for d in docs {
        for rs in d["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_string();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for sp in ss["spans"].as_array().into_iter().flatten() {
                    let f = |k: &str| sp[k].as_str().unwrap_or_default().to_string();
                    out.push((service.clone(), f("traceId"), f("spanId"), f("parentSpanId"), f("name")));
                }
            }
        }
    }
    out
}

/// One event's trace goes through all four services: ingest's span is the
/// root, the router's is its child, the shard's the router's, the notifier's
/// the shard's — exported over OTLP to a receiver the test runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_is_traced_through_all_four_services() {
    let (endpoint, received) = otlp_receiver().await;
    let purchase = cepheid_rules::parse_rule_json(
        r#"{"id":"purchase_seen","version":1,"key_by":["userId"],
            "pattern":[{"name":"p","where":"eventType = 'purchase'"}],
            "action":{"targets":["file:alerts"]}}"#,
    )
    .unwrap();
    let c = Cluster::start_with(Bus::memory(), "traces", Opts { otlp: Some(endpoint), rules: vec![purchase], ..Opts::default() }).await;
    let lines = input();
    let first_purchase = lines.iter().position(|l| l.contains("\"purchase\"")).expect("the sample has purchases");
    let mut posted: Vec<String> = lines[..=first_purchase].to_vec();
    posted.push(CLOSING.to_string());
    c.post(&posted).await;
    c.until_delivered(1).await;
    let chain = ["cepheid-ingest", "cepheid-keygen-router", "cepheid-matcher-shard", "cepheid-notifier"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let found = loop {
        let all = spans(&received.lock().unwrap());
        // A notifier span, followed up its parents to ingest's root span.
        let complete = all.iter().filter(|s| s.0 == "cepheid-notifier").find_map(|leaf| {
            let mut path = vec![leaf.clone()];
            while let Some(parent) = all.iter().find(|s| s.1 == leaf.1 && s.2 == path.last().unwrap().3) {
                path.push(parent.clone());
            }
            let services: Vec<&str> = path.iter().rev().map(|s| s.0.as_str()).collect();
            (services == chain && path.last().unwrap().3.is_empty()).then_some(path)
        });
        if let Some(p) = complete {
            break p;
        }
        assert!(tokio::time::Instant::now() < deadline, "no complete trace among {} spans: {:?}", all.len(), all.iter().take(12).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("trace: {found:?}");
    let names: Vec<&str> = found.iter().rev().map(|s| s.4.as_str()).collect();
    assert_eq!(names, ["ingest.accept", "router.route", "shard.match", "notifier.deliver"]);
    assert!(found.iter().all(|s| s.1 == found[0].1), "one trace id");
    c.finish().await;
}
