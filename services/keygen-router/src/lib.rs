//! The keygen-router: between ingest and the matcher shards.
//!
//! For each event of the events topic it finds the enabled rules whose
//! `filter` admits it — through an index of the filters' equality atoms, so
//! 10⁵ rules do not mean 10⁵ evaluations. It must not use the rules' start
//! conditions: only a shard knows whether a key holds partial matches, and a
//! rule with live state needs its whole filtered stream. The rules are grouped
//! by their `key_by`; for each distinct key the event is published once to the
//! keyed topic, partitioned by jump consistent hashing of the key.
//!
//! The events bound for one keyed partition travel together in one record, a
//! frame ([`cepheid_bus::frame`]: per event its key `signature|key`, event
//! time, source, traceparent, the event as received and where it was read —
//! events partition, offset, index in the record — so that a shard takes an
//! event once when a router that took over an events partition before its
//! predecessor's commit routes it again), sent when the events
//! topic has nothing more at the moment, when full, or `frame_linger_ms` after
//! its first event: a broker's cost is mostly per record. A frame carries the
//! router's watermark per source as of sending it (`cepheid-watermarks`, a
//! JSON object, and `cepheid-router`), which applies after the frame's events
//! (Flink sends watermarks in-band the same way). A partition that got no
//! frame when the watermark moved gets a watermark record at once: a record
//! with no key, an empty payload and headers `cepheid-watermark`,
//! `cepheid-source`, `cepheid-router`. Every `watermark_interval_ms` the
//! router also sends such records, after any open frames, to each partition
//! it told nothing for that long — so a shard keeps hearing from a router
//! whose watermark stands (it forgets routers silent for `router_expiry_ms`),
//! and busy partitions get no records beyond their frames. A shard takes the
//! minimum over routers.
//!
//! A source's watermark is the minimum over the router's input partitions of
//! each one's newest event time, less the source's out-of-orderness bound.
//! An ingest frame's `cepheid-frontier` header (the newest time of the post it
//! came from) counts as its partition's newest time too: a post is spread
//! over the partitions by key, and otherwise a partition whose share of the
//! post stops short of the post's newest event would hold the watermark back
//! until the next post.
//!
//! Rules come from the Redis rule store: a full resync at start and whenever
//! the change feed ends (pub/sub drops messages while disconnected), live
//! updates in between.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use cepheid_bus::frame::{self, Entry, FrameWriter, FRAME_HEADER, FRAME_VERSION, FRONTIER_HEADER, ORIGIN_TOPIC_HEADER};
use cepheid_bus::{partition_for, Bus};
use cepheid_telemetry::{Kind, Telemetry, Traced, TRACEPARENT};
use cepheid_engine::engine::EngineConfig;
use cepheid_engine::index::{required_atoms, Gate, RuleIndex};
use cepheid_engine::key::KeyVals;
use cepheid_rules::{compile, CompiledRule, NoStages, RuleSpec};
use cepheid_state::rules::{RedisRuleStore, RuleUpdate};
use cepheid_types::{EventDecoder, FieldId, FieldRegistry};
use serde::Deserialize;

/// The `[router]` configuration section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    #[serde(default = "events_topic")]
    pub events_topic: String,
    /// Partitions of the events topic when the router is the first to create
    /// it (ingest's `events_partitions`; the same default).
    #[serde(default = "partitions")]
    pub events_partitions: i32,
    #[serde(default = "keyed_topic")]
    pub keyed_topic: String,
    #[serde(default = "partitions")]
    pub keyed_partitions: i32,
    #[serde(default = "group")]
    pub group: String,
    /// Identifies this router in watermark records (default: host and pid).
    #[serde(default)]
    pub router_id: Option<String>,
    #[serde(default = "interval")]
    pub watermark_interval_ms: u64,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[serde(default = "listen")]
    pub listen: String,
    /// Where late events go, with the reason.
    #[serde(default = "dead_letter_topic")]
    pub dead_letter_topic: String,
    /// An input partition that delivered nothing for this long (wall clock)
    /// stops holding the watermark back; until every assigned partition has
    /// delivered a record or gone idle, no watermark is sent.
    #[serde(default = "idle_partition_ms")]
    pub idle_partition_ms: u64,
    /// Events bound for one keyed partition travel in one record (a frame)
    /// of at most this many events…
    #[serde(default = "frame_max_events")]
    pub frame_max_events: usize,
    /// …or this many bytes…
    #[serde(default = "frame_max_bytes")]
    pub frame_max_bytes: usize,
    /// …sent when the events topic has nothing more at the moment, or at the
    /// latest this long (ms) after the first event went in.
    #[serde(default = "frame_linger_ms")]
    pub frame_linger_ms: u64,
}

fn frame_max_events() -> usize {
    1_000
}
fn frame_max_bytes() -> usize {
    512 * 1024
}
fn frame_linger_ms() -> u64 {
    5
}

fn idle_partition_ms() -> u64 {
    5_000
}

fn dead_letter_topic() -> String {
    "cepheid.dead-letter".into()
}

fn listen() -> String {
    "0.0.0.0:9101".into()
}

fn events_topic() -> String {
    "cepheid.events".into()
}
fn keyed_topic() -> String {
    "cepheid.keyed".into()
}
fn partitions() -> i32 {
    8
}
fn group() -> String {
    "cepheid-router".into()
}
fn interval() -> u64 {
    200
}

impl Default for RouterConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

struct Rule {
    compiled: CompiledRule,
    /// Index into `Router::sigs`.
    sig: usize,
}

/// What the router makes of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routed {
    /// Keyed records to publish (none when no enabled rule admits the event).
    Routes { time: i64, routes: Vec<Route> },
    /// Older than the source's watermark: never matched (as in `cepheid run`).
    Late { time: i64, watermark: i64 },
}

/// One keyed record to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The key_by field paths.
    pub signature: String,
    /// The key values, rendered.
    pub key: String,
}

/// The routing table: rules, their filter index, key signatures, watermarks.
pub struct Router {
    engine: EngineConfig,
    registry: FieldRegistry,
    rules: BTreeMap<String, Rule>,
    slots: Vec<Option<String>>,
    index: RuleIndex,
    sigs: Vec<(String, Vec<FieldId>)>,
    /// Per source: (time field, bound, newest time seen per input partition).
    sources: HashMap<String, (FieldId, i64, BTreeMap<i32, i64>)>,
    /// Assigned input partitions → (wall-clock ms of the last record or of the
    /// assignment, whether a record came). None until an assignment is known.
    heard: Option<HashMap<i32, (i64, bool)>>,
    /// Per source, the last watermark sent: it never goes back, and an event
    /// behind it is late even when its own partition is behind the others.
    sent: HashMap<String, i64>,
    idle_ms: i64,
}

impl Router {
    pub fn new(engine: EngineConfig) -> Router {
        Router {
            engine,
            registry: FieldRegistry::new(),
            rules: BTreeMap::new(),
            slots: Vec::new(),
            index: RuleIndex::default(),
            sigs: Vec::new(),
            sources: HashMap::new(),
            heard: None,
            sent: HashMap::new(),
            idle_ms: idle_partition_ms() as i64,
        }
    }

    /// How long an input partition may deliver nothing before it stops holding the watermark back.
    pub fn set_idle_partition_ms(&mut self, ms: u64) {
        self.idle_ms = ms as i64;
    }

    /// Notes a record of an input partition (wall-clock ms).
    pub fn heard_from(&mut self, partition: i32, now_ms: i64) {
        if let Some(h) = &mut self.heard {
            h.insert(partition, (now_ms, true));
        }
    }

    /// Adds or replaces a rule (disabled rules are removed: they see nothing).
    pub fn upsert(&mut self, spec: &RuleSpec) -> Result<(), cepheid_rules::Diagnostics> {
        self.remove(&spec.id);
        if !spec.enabled {
            return Ok(());
        }
        let compiled = compile(spec, &mut self.registry)?;
        let fields: Vec<String> = spec.key_by.clone();
        let sig_name = fields.join(",");
        let sig = match self.sigs.iter().position(|(n, _)| *n == sig_name) {
            Some(i) => i,
            None => {
                self.sigs.push((sig_name, compiled.key_by.clone()));
                self.sigs.len() - 1
            }
        };
        let gate = match compiled.filter.as_deref().and_then(|f| required_atoms(f).into_iter().next()) {
            Some((f, vals)) => Gate::Filter(f, vals),
            None => Gate::None,
        };
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some(spec.id.clone());
        self.index.insert(slot, gate);
        self.rules.insert(spec.id.clone(), Rule { compiled, sig });
        Ok(())
    }

    pub fn remove(&mut self, id: &str) {
        if self.rules.remove(id).is_some() {
            if let Some(slot) = self.slots.iter().position(|s| s.as_deref() == Some(id)) {
                self.index.remove(slot);
                self.slots[slot] = None;
            }
        }
    }

    /// Applies what the rule store reports: a full resync (rules not in it
    /// are dropped), a stored rule, or a deleted one. A stored rule that does
    /// not compile here (a newer or older build) is reported and skipped.
    pub fn follow(&mut self, u: RuleUpdate) {
        let upsert = |router: &mut Router, spec: &RuleSpec| {
            if let Err(d) = router.upsert(spec) {
                tracing::warn!("router: stored rule `{}` does not compile here: {d}", spec.id);
            }
        };
        match u {
            RuleUpdate::All(all) => {
                for id in RuleUpdate::gone(&all, self.rules.keys().map(String::as_str)) {
                    self.remove(&id);
                }
                for spec in &all {
                    upsert(self, spec);
                }
            }
            RuleUpdate::Upsert(spec) => upsert(self, &spec),
            RuleUpdate::Delete(id) => self.remove(&id),
        }
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    fn source(&mut self, name: &str) -> (FieldId, i64) {
        if let Some((f, b, _)) = self.sources.get(name) {
            return (*f, *b);
        }
        let sc = self.engine.sources.get(name).cloned().unwrap_or_else(|| self.engine.default_source.clone());
        let f = self.registry.intern(&sc.time_field);
        self.sources.insert(name.to_string(), (f, sc.out_of_orderness_ms, BTreeMap::new()));
        (f, sc.out_of_orderness_ms)
    }

    /// What an event becomes: keyed records, or late. An event without the
    /// time field yields an error. (One input partition; see [`Router::route_from`].)
    pub fn route(&mut self, source: &str, text: &str) -> Result<Routed, cepheid_types::DecodeError> {
        self.route_from(source, 0, text)
    }

    /// As [`Router::route`], for an event read from input partition
    /// `partition`. Event time is tracked per input partition (each is in
    /// order on its own, not with the others): an event is late when it is
    /// behind its own partition's watermark, and the router's watermark for
    /// the source is the minimum over its partitions.
    pub fn route_from(&mut self, source: &str, partition: i32, text: &str) -> Result<Routed, cepheid_types::DecodeError> {
        let (tf, bound) = self.source(source);
        let ev = EventDecoder::new(&self.registry, tf).decode(text)?;
        let t = ev.time();
        if let Some(e) = self.sources.get_mut(source) {
            let max = e.2.entry(partition).or_insert(t);
            let watermark = max.saturating_sub(bound).max(self.sent.get(source).copied().unwrap_or(i64::MIN));
            if t < watermark {
                return Ok(Routed::Late { time: t, watermark });
            }
            *max = (*max).max(t);
        }
        let mut cand = Vec::new();
        self.index.candidates(&ev, &mut cand);
        let mut sigs_hit: Vec<usize> = Vec::new();
        for slot in cand {
            let Some(id) = self.slots.get(slot).and_then(|s| s.as_ref()) else { continue };
            let rule = &self.rules[id];
            if rule.compiled.spec.source.as_deref().is_some_and(|s| s != source) {
                continue;
            }
            if let Some(f) = &rule.compiled.filter {
                if !f.holds(&NoStages(&ev)) {
                    continue;
                }
            }
            if !sigs_hit.contains(&rule.sig) {
                sigs_hit.push(rule.sig);
            }
        }
        sigs_hit.sort_unstable();
        let mut routes = Vec::new();
        for s in sigs_hit {
            let (name, fields) = &self.sigs[s];
            if let Some(key) = KeyVals::of(&ev, fields) {
                routes.push(Route { signature: name.clone(), key: key.repr() });
            }
        }
        Ok(Routed::Routes { time: t, routes })
    }

    /// Raises input partition `partition`'s newest time of `source` to at
    /// least `t` without an event: ingest's frontier for a post (see
    /// [`cepheid_bus::frame::FRONTIER_HEADER`]).
    pub fn frontier(&mut self, source: &str, partition: i32, t: i64) {
        self.source(source);
        if let Some(e) = self.sources.get_mut(source) {
            let max = e.2.entry(partition).or_insert(t);
            *max = (*max).max(t);
        }
    }

    /// Current watermark of every source seen: the minimum over its input
    /// partitions of (newest time − bound).
    /// The watermark to send per source: the minimum over the input partitions
    /// that are not idle (all of them when every one is). Nothing while an
    /// assigned partition has not delivered its first record and is not idle
    /// yet: its events may be older than the others'. Never goes back.
    pub fn watermarks(&mut self, now_ms: i64) -> Vec<(String, i64)> {
        let mut names: Vec<String> = self.sources.keys().cloned().collect();
        names.sort();
        names.into_iter().filter_map(|s| self.watermark_now(&s, now_ms).map(|w| (s, w))).collect()
    }

    /// The watermark of one source to send now, as [`Router::watermarks`]
    /// computes it (and, like it, remembered as sent); `None` while the
    /// partitions hold it back or nothing of the source was seen.
    pub fn watermark_now(&mut self, source: &str, now_ms: i64) -> Option<i64> {
        let idle = |last: i64| now_ms - last >= self.idle_ms;
        if let Some(h) = &self.heard {
            if h.values().any(|(last, seen)| !seen && !idle(*last)) {
                return None;
            }
        }
        let active = |p: &i32| self.heard.as_ref().is_none_or(|h| h.get(p).is_some_and(|(last, _)| !idle(*last)));
        let (_, bound, per) = self.sources.get(source)?;
        let m = per.iter().filter(|(p, _)| active(p)).map(|(_, m)| *m).min().or_else(|| per.values().min().copied())?;
        let sent = self.sent.get(source).copied().unwrap_or(i64::MIN);
        let w = m.saturating_sub(*bound).max(sent);
        if w != sent {
            self.sent.insert(source.to_string(), w);
        }
        Some(w)
    }

    /// The input partitions this router now reads (after a rebalance): others
    /// no longer hold its watermark back; new ones do until they deliver a
    /// record or go idle.
    pub fn keep_partitions(&mut self, assigned: &[i32], now_ms: i64) {
        for (_, _, per) in self.sources.values_mut() {
            per.retain(|p, _| assigned.contains(p));
        }
        let old = self.heard.take().unwrap_or_default();
        self.heard = Some(assigned.iter().map(|p| (*p, old.get(p).copied().unwrap_or((now_ms, false)))).collect());
    }
}

/// Counters of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub events: u64,
    pub routed: u64,
    /// Frames (records of the keyed topic holding events) published.
    pub frames: u64,
    pub unrouted: u64,
    pub rejected: u64,
    /// Events behind their source's watermark (sent to the dead-letter topic).
    pub late: u64,
    /// Events ingest forwarded again from a raw topic (their raw position was
    /// routed before), dropped.
    pub duplicates: u64,
    pub watermarks_sent: u64,
    /// Rules loaded at the last count.
    pub rules: u64,
    /// Events of the assigned partitions not yet committed.
    pub consumer_lag: u64,
    /// Times an events partition was read again for a hole in its offsets (a broker quirk; 0 on Kafka).
    pub holes_read_again: u64,
}

impl Report {
    /// Prometheus text.
    pub fn prometheus(&self) -> String {
        let mut s = String::new();
        for (name, kind, help, v) in [
            ("cepheid_router_events_total", "counter", "Events read from the events topic.", self.events),
            ("cepheid_router_routed_total", "counter", "Events published to the keyed topic (one per event and key signature).", self.routed),
            ("cepheid_router_frames_total", "counter", "Keyed records (frames of events) published.", self.frames),
            ("cepheid_router_unrouted_total", "counter", "Events no enabled rule admits.", self.unrouted),
            ("cepheid_router_rejected_total", "counter", "Events that cannot be decoded (no time field, not JSON).", self.rejected),
            ("cepheid_router_late_total", "counter", "Events behind their source's watermark, dead-lettered.", self.late),
            ("cepheid_router_duplicates_total", "counter", "Events ingest forwarded again from a raw topic (after a restart), dropped.", self.duplicates),
            ("cepheid_router_watermarks_total", "counter", "Watermark records sent.", self.watermarks_sent),
            ("cepheid_router_rules", "gauge", "Enabled rules loaded.", self.rules),
            ("cepheid_router_consumer_lag", "gauge", "Events of the assigned events partitions after the committed offsets.", self.consumer_lag),
            ("cepheid_router_holes_read_again_total", "counter", "Times an events partition was read again for a hole in its offsets (0 on Kafka).", self.holes_read_again),
        ] {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        }
        s
    }
}

fn http(report: std::sync::Arc<std::sync::Mutex<Report>>, bus: Bus, topic: String) -> axum::Router {
    use axum::routing::get;
    let r2 = report.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let (bus, topic, report) = (bus.clone(), topic.clone(), r2.clone());
                async move {
                    let rules = report.lock().unwrap().rules;
                    match bus.partitions(&topic).await {
                        Ok(_) if rules > 0 => (axum::http::StatusCode::OK, "ready".to_string()),
                        Ok(_) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no rules loaded".to_string()),
                        Err(e) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("keyed topic unreachable: {e}")),
                    }
                }
            }),
        )
        .route("/metrics", get(move || {
            let report = report.clone();
            async move { report.lock().unwrap().prometheus() }
        }))
}

/// Runs until `shutdown`. Events are committed after their keyed records
/// were acknowledged.
pub async fn run(
    cfg: RouterConfig,
    engine: EngineConfig,
    bus: Bus,
    rules: RedisRuleStore,
    telemetry: std::sync::Arc<Telemetry>,
    http_listener: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Report> {
    bus.create_topic(&cfg.keyed_topic, cfg.keyed_partitions).await?;
    bus.create_topic(&cfg.events_topic, cfg.events_partitions).await?;
    bus.create_topic(&cfg.dead_letter_topic, 1).await?;
    let partitions = bus.partitions(&cfg.keyed_topic).await?;
    let router_id = cfg.router_id.clone().unwrap_or_else(default_router_id);
    let mut router = Router::new(engine);
    router.set_idle_partition_ms(cfg.idle_partition_ms);
    let mut updates = rules.watch("router");
    // Every rule before the first event.
    match updates.recv().await {
        Some(u) => router.follow(u?),
        None => anyhow::bail!("router: the rule store watch ended before the first resync"),
    }
    // Only ingest writes the events topic: a hole in its offsets is records not readable yet.
    let mut consumer = bus.subscribe(&cfg.group, &[&cfg.events_topic])?.contiguous();
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.watermark_interval_ms.max(10)));
    let mut report = Report::default();
    let shared = std::sync::Arc::new(std::sync::Mutex::new(Report::default()));
    let server = http_listener.map(|l| {
        let app = http(shared.clone(), bus.clone(), cfg.keyed_topic.clone());
        tokio::spawn(async move { axum::serve(l, app).await })
    });
    tokio::pin!(shutdown);
    // Records are enqueued in order and acknowledged together: an event's
    // offset is committed once every record enqueued up to it is acknowledged.
    let mut out = Outbox::new(partitions);
    // Per raw origin stream and partition, the last raw offset routed (since the last rebalance).
    let mut raw_routed: std::collections::HashMap<(u32, i32), i64> = std::collections::HashMap::new();
    loop {
        report.rules = router.rule_count() as u64;
        report.watermarks_sent += std::mem::take(&mut out.watermark_records);
        report.consumer_lag = consumer.lag().unwrap_or(0);
        report.holes_read_again = consumer.holes_read_again();
        *shared.lock().unwrap() = report.clone();
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            u = updates.recv() => match u {
                Some(u) => router.follow(u?),
                None => anyhow::bail!("router: the rule store watch ended"),
            },
            _ = tick.tick() => {
                // Every event framed so far goes before the watermark that may pass it.
                // (Partitions whose watermark moved are told by `send_frames`.)
                report.frames += out.send_frames(&bus, &cfg, &mut router, &router_id).await?;
                out.keep_alive(&bus, &cfg.keyed_topic, &router_id, Duration::from_millis(cfg.watermark_interval_ms.max(10))).await?;
            }
            m = consumer.recv() => {
                let m = match m {
                    Ok(m) => m,
                    Err(e) if e.is_transient() => { tracing::warn!("router: bus: {e}; retrying"); continue; }
                    Err(e) => return Err(e.into()),
                };
                if let Some(assigned) = consumer.assignment_changed() {
                    let mine: Vec<i32> = assigned.iter().filter(|(t, _)| *t == cfg.events_topic).map(|(_, p)| *p).collect();
                    router.keep_partitions(&mine, wall_ms());
                    // Only what was read while owning a partition without a break counts.
                    raw_routed.clear();
                }
                router.heard_from(m.partition, wall_ms());
                // Where its events were read: the events record, or — for a record
                // ingest forwarded from a raw topic — the raw record (forwarded again
                // after an ingest restart, it is at a new events offset).
                let raw = if m.header(FRAME_HEADER).is_none() { m.header(frame::RAW_ORIGIN_HEADER) } else { None };
                let origin = match raw.map(|h| (h, frame::parse_raw_origin(h))) {
                    Some((_, Some((topic, partition, offset)))) => {
                        let stream = out.raw_stream(topic, &m.topic, m.partition);
                        // Forwarded again (ingest restarted before committing it): already
                        // routed — dropped here rather than dead-lettered as late (or sent
                        // for the shards to drop).
                        let last = raw_routed.entry((stream, partition)).or_insert(-1);
                        if offset <= *last {
                            report.duplicates += 1;
                            out.done(&m.topic, m.partition, m.offset + 1);
                            continue;
                        }
                        *last = offset;
                        (stream, partition, offset)
                    }
                    Some((h, None)) => {
                        tracing::warn!(topic = %m.topic, partition = m.partition, offset = m.offset, "router: unreadable {} header {:?}; the record's origin is taken as its own", frame::RAW_ORIGIN_HEADER, String::from_utf8_lossy(h));
                        (out.stream(&m.topic), m.partition, m.offset)
                    }
                    None => (out.stream(&m.topic), m.partition, m.offset),
                };
                let input = Input { topic: &m.topic, partition: m.partition, offset: m.offset, origin };
                let mut ctx = RouteCtx { router: &mut router, out: &mut out, report: &mut report, bus: &bus, cfg: &cfg, telemetry: &telemetry, partitions, router_id: &router_id, key: String::new() };
                if m.header(FRAME_HEADER).is_some() {
                    // Ingest's frame: the events of one post bound for this partition.
                    for (index, e) in frame::entries(&m.payload).enumerate() {
                        match e {
                            Ok(e) => ctx.route(&input, index as u32, e.source, e.trace.map(str::as_bytes), e.payload).await?,
                            Err(e) => {
                                ctx.report.rejected += 1;
                                tracing::warn!(topic = %m.topic, partition = m.partition, offset = m.offset, "router: unreadable frame: {e}; the rest of the record is dropped");
                            }
                        }
                    }
                    if let Some(h) = m.header(FRONTIER_HEADER) {
                        match serde_json::from_slice::<BTreeMap<String, i64>>(h) {
                            Ok(f) => {
                                for (source, t) in f {
                                    router.frontier(&source, m.partition, t);
                                }
                            }
                            Err(e) => tracing::warn!(topic = %m.topic, partition = m.partition, offset = m.offset, "router: unreadable {FRONTIER_HEADER} header: {e}"),
                        }
                    }
                } else {
                    let source = m.header("cepheid-source").map(String::from_utf8_lossy).unwrap_or(std::borrow::Cow::Borrowed("default"));
                    ctx.route(&input, 0, &source, m.header(TRACEPARENT), &m.payload).await?;
                }
                out.done(&m.topic, m.partition, m.offset + 1);
                // Waited long enough (a steady stream never pauses for the idle branch below).
                if out.frames_due(&cfg) {
                    report.frames += out.send_frames(&bus, &cfg, &mut router, &router_id).await?;
                }
                if out.len() >= OUTBOX_LIMIT {
                    out.flush(&consumer).await?;
                }
            }
            // The events topic has nothing at the moment: the frames go.
            _ = std::future::ready(()), if out.has_frames() => {
                report.frames += out.send_frames(&bus, &cfg, &mut router, &router_id).await?;
            }
            // Nothing else to do: wait for the acknowledgements and commit.
            r = out.acked(), if !out.is_empty() => {
                r?;
                out.commit(&consumer)?;
            }
        }
    }
    report.frames += out.send_frames(&bus, &cfg, &mut router, &router_id).await?;
    report.watermarks_sent += std::mem::take(&mut out.watermark_records);
    out.flush(&consumer).await?;
    telemetry.flush();
    if let Some(s) = server {
        s.abort();
    }
    Ok(report)
}

/// Where an event was read.
struct Input<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    /// Its origin's stream, partition and offset (see [`frame::ORIGIN_TOPIC_HEADER`]).
    origin: (u32, i32, i64),
}

/// What routing one event touches.
struct RouteCtx<'a> {
    router: &'a mut Router,
    out: &'a mut Outbox,
    report: &'a mut Report,
    bus: &'a Bus,
    cfg: &'a RouterConfig,
    telemetry: &'a Telemetry,
    partitions: i32,
    router_id: &'a str,
    /// The keyed record key being written (`signature|key`), reused.
    key: String,
}

impl RouteCtx<'_> {
    /// Routes one event, the `index`th of its record: into the frames of its
    /// keys' partitions (each entry carrying where it was read, so that a
    /// shard takes it once should it be routed again), or to the dead-letter
    /// topic when late; an event that cannot be decoded is counted and logged.
    async fn route(&mut self, input: &Input<'_>, index: u32, source: &str, traceparent_in: Option<&[u8]>, payload: &[u8]) -> anyhow::Result<()> {
        self.report.events += 1;
        let trace = self.telemetry.continue_trace("router.route", Kind::Consumer, traceparent_in);
        let traceparent = trace.as_ref().map(Traced::traceparent);
        let text = String::from_utf8_lossy(payload);
        match self.router.route_from(source, input.partition, &text) {
            Err(e) => {
                self.report.rejected += 1;
                if let Some(t) = &trace {
                    t.error(e.to_string());
                }
                tracing::warn!(topic = %input.topic, partition = input.partition, offset = input.offset, trace_id = trace.as_ref().map(Traced::trace_id), "router: event refused: {e}");
            }
            Ok(Routed::Late { time, watermark }) => {
                self.report.late += 1;
                let reason = format!("late: event time {time} is behind the watermark {watermark}");
                self.out.push(self.bus, &self.cfg.dead_letter_topic, None, None, payload, &[("cepheid-reason", reason.as_bytes()), ("cepheid-source", source.as_bytes())]).await?;
            }
            Ok(Routed::Routes { routes, .. }) if routes.is_empty() => self.report.unrouted += 1,
            Ok(Routed::Routes { time, routes }) => {
                if let Some(t) = &trace {
                    t.attribute("cepheid.keyed_records", routes.len() as i64);
                }
                let mut full = false;
                for r in routes {
                    self.key.clear();
                    self.key.push_str(&r.signature);
                    self.key.push('|');
                    self.key.push_str(&r.key);
                    let (stream, partition, offset) = input.origin;
                    let origin = Some(frame::Origin { stream, partition, offset, index });
                    let e = Entry { key: self.key.as_bytes(), time, source, trace: traceparent.as_deref(), payload, origin };
                    full |= self.out.frame(self.partitions, &e, self.cfg);
                    self.report.routed += 1;
                }
                if full {
                    self.report.frames += self.out.send_frames(self.bus, self.cfg, self.router, self.router_id).await?;
                }
            }
        }
        Ok(())
    }
}

/// `router-<host>-<pid>`: the pid alone is the same (1) in every container,
/// and shards must tell the routers apart (each holds the watermark back).
fn default_router_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("router-{host}-{}", std::process::id())
}

/// Records acknowledged together before their events are committed.
const OUTBOX_LIMIT: usize = 5_000;

/// Records enqueued and not yet acknowledged, and the offsets they cover;
/// the frames being filled, and the offsets of the events in them.
struct Outbox {
    acks: std::collections::VecDeque<cepheid_bus::Delivery>,
    offsets: std::collections::BTreeMap<(String, i32), i64>,
    /// Per keyed partition.
    frames: Vec<FrameWriter>,
    /// Per input partition, the next offset after the events read since the
    /// frames were last sent: committed only after them.
    framed: Vec<(String, i32, i64)>,
    /// When the first of those events was read.
    opened: Option<tokio::time::Instant>,
    /// Per keyed partition, the watermarks last sent to it (with a frame or as watermark records).
    told: Vec<Vec<(String, i64)>>,
    /// Per keyed partition, when it was last sent a record (a frame or a
    /// watermark record): [`Outbox::keep_alive`] leaves partitions told lately alone.
    last_told: Vec<Option<tokio::time::Instant>>,
    /// Watermark records sent by `send_frames` and `keep_alive`, not yet counted in the report.
    watermark_records: u64,
    /// The origin streams named so far (entries' [`frame::Origin::stream`]
    /// index it), and the list as every frame's [`ORIGIN_TOPIC_HEADER`].
    streams: Vec<String>,
    streams_header: String,
    /// (raw topic, events partition) → its stream's index (no name formatted per record).
    raw_streams: Vec<(String, i32, u32)>,
}

impl Outbox {
    fn new(partitions: i32) -> Outbox {
        Outbox {
            acks: Default::default(),
            offsets: Default::default(),
            frames: (0..partitions.max(1)).map(|_| FrameWriter::default()).collect(),
            framed: Default::default(),
            opened: None,
            told: vec![Vec::new(); partitions.max(1) as usize],
            last_told: vec![None; partitions.max(1) as usize],
            watermark_records: 0,
            streams: Vec::new(),
            streams_header: String::new(),
            raw_streams: Vec::new(),
        }
    }
    /// The index of the stream of raw topic `raw` via partition `partition` of events topic `events`.
    fn raw_stream(&mut self, raw: &str, events: &str, partition: i32) -> u32 {
        if let Some((_, _, i)) = self.raw_streams.iter().find(|(t, p, _)| t == raw && *p == partition) {
            return *i;
        }
        let i = self.stream(&frame::raw_stream(raw, events, partition));
        self.raw_streams.push((raw.to_string(), partition, i));
        i
    }
    /// The index of origin stream `name` (added to the list when new; the
    /// list only grows, so frames sent earlier keep their meaning).
    fn stream(&mut self, name: &str) -> u32 {
        if let Some(i) = self.streams.iter().position(|s| s == name) {
            return i as u32;
        }
        self.streams.push(name.to_string());
        self.streams_header = self.streams.join(",");
        (self.streams.len() - 1) as u32
    }
    fn len(&self) -> usize {
        self.acks.len()
    }
    fn is_empty(&self) -> bool {
        self.acks.is_empty() && self.offsets.is_empty()
    }
    fn has_frames(&self) -> bool {
        self.opened.is_some()
    }
    /// Adds an event to its partition's frame; true when that frame is full.
    fn frame(&mut self, partitions: i32, e: &Entry<'_>, cfg: &RouterConfig) -> bool {
        let f = &mut self.frames[partition_for(e.key, partitions) as usize];
        f.push(e);
        f.len() >= cfg.frame_max_events.max(1) || f.bytes() >= cfg.frame_max_bytes
    }
    fn frames_due(&self, cfg: &RouterConfig) -> bool {
        self.opened.is_some_and(|o| o.elapsed() >= Duration::from_millis(cfg.frame_linger_ms))
    }
    /// Enqueues every open frame, with the router's watermarks as of now
    /// (they apply after the frame's events), and releases the offsets of
    /// the events read so far for committing once acknowledged. A keyed
    /// partition without a frame gets a watermark record when the watermark
    /// moved since it was last told: a match there that waits for the
    /// watermark must not wait for the next event bound for it (or the
    /// `watermark_interval_ms` tick).
    async fn send_frames(&mut self, bus: &Bus, cfg: &RouterConfig, router: &mut Router, router_id: &str) -> anyhow::Result<u64> {
        let topic = cfg.keyed_topic.as_str();
        self.opened = None;
        let mut sent = 0;
        let now = tokio::time::Instant::now();
        let marks = router.watermarks(wall_ms());
        let text = (!marks.is_empty()).then(|| serde_json::to_string(&marks.iter().cloned().collect::<BTreeMap<_, _>>()).expect("a map of numbers"));
        for p in 0..self.frames.len() {
            if self.frames[p].is_empty() {
                if self.told[p] != marks {
                    self.watermark_records_to(bus, topic, p, &marks, router_id).await?;
                    self.told[p].clone_from(&marks);
                    if !marks.is_empty() {
                        self.last_told[p] = Some(now);
                    }
                }
                continue;
            }
            let payload = self.frames[p].take();
            let streams = self.streams_header.clone();
            let mut headers = vec![(FRAME_HEADER, FRAME_VERSION), (ORIGIN_TOPIC_HEADER, streams.as_bytes())];
            if let Some(m) = &text {
                headers.extend([("cepheid-watermarks", m.as_bytes()), ("cepheid-router", router_id.as_bytes())]);
            }
            self.push(bus, topic, Some(p as i32), None, &payload, &headers).await?;
            self.told[p].clone_from(&marks);
            if !marks.is_empty() {
                self.last_told[p] = Some(now);
            }
            sent += 1;
        }
        for (t, p, o) in self.framed.drain(..) {
            self.offsets.insert((t, p), o);
        }
        Ok(sent)
    }
    /// Sends its watermarks again to each keyed partition told nothing for
    /// `every` (a watermark record per source): a shard forgets a router not
    /// heard from for `router_expiry_ms`, and a partition without traffic
    /// must still hear that the watermark stands. Partitions told lately, by
    /// frames or records, get nothing — while events flow that is most of
    /// them, and a record per partition per interval is broker load for nothing.
    async fn keep_alive(&mut self, bus: &Bus, topic: &str, router_id: &str, every: Duration) -> anyhow::Result<()> {
        let now = tokio::time::Instant::now();
        for p in 0..self.told.len() {
            if self.told[p].is_empty() || self.last_told[p].is_some_and(|t| now.saturating_duration_since(t) < every) {
                continue;
            }
            let marks = std::mem::take(&mut self.told[p]);
            self.watermark_records_to(bus, topic, p, &marks, router_id).await?;
            self.told[p] = marks;
            self.last_told[p] = Some(now);
        }
        Ok(())
    }
    /// Enqueues a watermark record per source to keyed partition `p`: no
    /// key, an empty payload, headers `cepheid-watermark`, `cepheid-source`, `cepheid-router`.
    async fn watermark_records_to(&mut self, bus: &Bus, topic: &str, p: usize, marks: &[(String, i64)], router_id: &str) -> anyhow::Result<()> {
        for (source, w) in marks {
            let w = w.to_string();
            self.push(bus, topic, Some(p as i32), None, b"", &[("cepheid-watermark", w.as_bytes()), ("cepheid-source", source.as_bytes()), ("cepheid-router", router_id.as_bytes())]).await?;
            self.watermark_records += 1;
        }
        Ok(())
    }
    #[allow(clippy::too_many_arguments)]
    async fn push(
        &mut self,
        bus: &Bus,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> anyhow::Result<()> {
        match bus.enqueue(topic, partition, key, payload, headers).await {
            Ok(d) => self.acks.push_back(d),
            // The producer's queue is full: let it drain, then once more.
            Err(e) if e.is_transient() => {
                self.acked().await?;
                self.acks.push_back(bus.enqueue(topic, partition, key, payload, headers).await?);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
    /// An event is routed: its offset is committed once its frame is sent and acknowledged.
    fn done(&mut self, topic: &str, partition: i32, next: i64) {
        match self.framed.iter_mut().find(|(t, p, _)| t == topic && *p == partition) {
            Some(e) => e.2 = next,
            None => self.framed.push((topic.to_string(), partition, next)),
        }
        self.opened.get_or_insert_with(tokio::time::Instant::now);
    }
    /// Waits for every acknowledgement. Cancel-safe: an acknowledgement
    /// leaves the outbox only once received.
    async fn acked(&mut self) -> anyhow::Result<()> {
        while let Some(front) = self.acks.front_mut() {
            let r = front.await;
            self.acks.pop_front();
            r?;
        }
        Ok(())
    }
    /// Waits for every acknowledgement, then commits the offsets covered.
    async fn flush(&mut self, consumer: &cepheid_bus::Consumer) -> anyhow::Result<()> {
        self.acked().await?;
        self.commit(consumer)
    }
    fn commit(&mut self, consumer: &cepheid_bus::Consumer) -> anyhow::Result<()> {
        for ((t, p), o) in std::mem::take(&mut self.offsets) {
            consumer.commit(&t, p, o)?;
        }
        Ok(())
    }
}


/// Wall-clock milliseconds (input partition idleness only; event time drives everything else).
fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which keyed partitions got a watermark record since the last call.
    async fn told_by_records(keyed: &mut cepheid_bus::Consumer) -> Vec<i32> {
        let mut got = Vec::new();
        while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(1), keyed.recv()).await {
            if m.header("cepheid-watermark").is_some() {
                got.push(m.partition);
            }
        }
        got.sort_unstable();
        got
    }

    /// The interval's watermark records go only to partitions told nothing
    /// (neither a frame nor a record) for an interval; those told lately get none.
    #[tokio::test(start_paused = true)]
    async fn watermarks_are_sent_again_only_to_partitions_told_nothing_lately() {
        let bus = Bus::memory();
        bus.create_topic("keyed", 3).await.unwrap();
        let mut keyed = bus.subscribe("reader", &["keyed"]).unwrap();
        let mut router = Router::new(EngineConfig::default());
        router.route_from("clickstream", 0, r#"{"eventTime":10000,"userId":7}"#).unwrap();
        let cfg = RouterConfig { keyed_topic: "keyed".into(), ..RouterConfig::default() };
        let mut out = Outbox::new(3);
        let every = Duration::from_millis(200);
        let event = Entry { key: b"userId|7", time: 10_000, source: "clickstream", trace: None, payload: b"{}", origin: None };
        let framed = partition_for(event.key, 3);
        let others: Vec<i32> = (0..3).filter(|p| *p != framed).collect();

        // t = 0: a frame to one partition; the watermark moved, so the others get a record at once.
        out.frame(3, &event, &cfg);
        assert_eq!(out.send_frames(&bus, &cfg, &mut router, "r").await.unwrap(), 1);
        assert_eq!(told_by_records(&mut keyed).await, others);
        // t = 100 ms: every partition was told lately.
        tokio::time::advance(Duration::from_millis(100)).await;
        out.keep_alive(&bus, "keyed", "r", every).await.unwrap();
        assert_eq!(told_by_records(&mut keyed).await, Vec::<i32>::new());
        // t = 250 ms: a frame to the same partition, the watermark unchanged:
        // the others, told at 0, hear it again; the framed one does not.
        tokio::time::advance(Duration::from_millis(150)).await;
        out.frame(3, &event, &cfg);
        out.send_frames(&bus, &cfg, &mut router, "r").await.unwrap();
        out.keep_alive(&bus, "keyed", "r", every).await.unwrap();
        assert_eq!(told_by_records(&mut keyed).await, others);
        // t = 450 ms: no traffic; every partition hears it again.
        tokio::time::advance(Duration::from_millis(200)).await;
        out.keep_alive(&bus, "keyed", "r", every).await.unwrap();
        assert_eq!(told_by_records(&mut keyed).await, vec![0, 1, 2]);
        assert_eq!(out.watermark_records, 7);
    }
}
