//! The ingest service: the front door of the cluster.
//!
//! - `POST /v1/events?source=NAME` with a JSON array or NDJSON body: each
//!   event is checked against the source's registered schema (a JSON object,
//!   an integer time field, required fields of the right types); the good
//!   ones go to the events topic, and the answer comes only after the bus
//!   acknowledged them: `202` when all were accepted, `400` naming each bad
//!   line and the reason (the good ones are kept), `503` when the bus failed.
//!   A post carrying an `Idempotency-Key` header is safe to send again
//!   ([`ledger`]): what it got stored is remembered in Redis, and the same
//!   post under the same key stores only the lines not stored yet (`409`
//!   while another post under the key runs, `422` for another body).
//! - Raw topics (e.g. `click_stream1`): records are checked the same way and
//!   forwarded; bad ones go to the dead-letter topic with the reason in the
//!   `cepheid-reason` header. Forwards are pipelined (up to 10 000 awaiting
//!   the broker's acknowledgement); a record's offset is committed once it and
//!   the records before it are acknowledged.
//! - `GET /healthz` (alive), `GET /readyz` (the events topic is reachable).
//!
//! Events are written as received (trimmed), to the partition of the schema's
//! `partition_key` field (jump hash; partition 0 without one). A post's events
//! bound for one partition travel as one record, a frame
//! ([`cepheid_bus::frame`], header `cepheid-frame`; each event with its
//! partition key, time, source and traceparent) and with the post's event-time
//! frontier (header `cepheid-frontier`, see [`FRONTIER_HEADER`]: so the
//! router's watermark follows the post as a whole, not each partition's share
//! of it, which may stop short of the post's newest event); a forwarded raw record is
//! one record, keyed by the partition key, with the source in the
//! `cepheid-source` header and where it was read in `cepheid-origin`
//! (`topic/partition/offset`: records forwarded again after a restart are
//! dropped as repeats downstream). The router reads both.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use cepheid_bus::frame::{Entry, FrameWriter, FRAME_HEADER, FRAME_VERSION, FRONTIER_HEADER, RAW_ORIGIN_HEADER};
use cepheid_bus::{partition_for, Bus};
use cepheid_telemetry::{Kind, Telemetry, Traced, TRACEPARENT};
use serde::Deserialize;
use serde_json::{json, Value};

pub mod ledger;

use ledger::{Begin, LedgerError, PostLedger};

/// Field types a schema can require.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Integer,
    Number,
    Boolean,
    Object,
    Array,
    Any,
}

impl FieldType {
    fn accepts(self, v: &Value) -> bool {
        match self {
            FieldType::String => v.is_string(),
            FieldType::Integer => v.is_i64() || v.is_u64(),
            FieldType::Number => v.is_number(),
            FieldType::Boolean => v.is_boolean(),
            FieldType::Object => v.is_object(),
            FieldType::Array => v.is_array(),
            FieldType::Any => !v.is_null(),
        }
    }
}

/// A registered event schema (one per source).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    #[serde(default = "time_field")]
    pub time_field: String,
    /// Required fields and their types.
    #[serde(default)]
    pub required: BTreeMap<String, FieldType>,
    /// Field whose value keys the record on the events topic.
    #[serde(default)]
    pub partition_key: Option<String>,
    /// An event whose time is further ahead of ingest's clock than this (ms)
    /// is refused (0: no limit). A post's newest event time moves the
    /// source's watermark for every partition (see the router), so one event
    /// from a client with a broken clock, or in microseconds, would make
    /// everything after it late.
    #[serde(default = "max_ahead_ms")]
    pub max_ahead_ms: u64,
}

fn max_ahead_ms() -> u64 {
    24 * 3_600_000
}

fn time_field() -> String {
    "eventTime".into()
}

impl Default for Schema {
    fn default() -> Self {
        Schema { time_field: time_field(), required: BTreeMap::new(), partition_key: None, max_ahead_ms: max_ahead_ms() }
    }
}

/// The `[ingest]` configuration section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    #[serde(default = "listen")]
    pub listen: String,
    #[serde(default = "events_topic")]
    pub events_topic: String,
    #[serde(default = "partitions")]
    pub events_partitions: i32,
    #[serde(default = "dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Raw topics to consume, each with the source its events belong to.
    #[serde(default)]
    pub raw_topics: BTreeMap<String, String>,
    #[serde(default = "group")]
    pub group: String,
    /// Schemas by source; sources not listed use `default_schema`.
    #[serde(default)]
    pub schemas: BTreeMap<String, Schema>,
    #[serde(default)]
    pub default_schema: Schema,
    /// Whether sources without a schema of their own are accepted.
    #[serde(default = "yes")]
    pub accept_unknown_sources: bool,
    /// Largest request body accepted (bytes); larger ones get 413.
    #[serde(default = "max_body")]
    pub max_body_bytes: usize,
    /// Posts with an `Idempotency-Key` header: how long what they stored is
    /// remembered (ms); the same post sent again within it stores only the
    /// lines not stored yet. Each keyed post holds ~270 bytes of Redis for
    /// this long: an hour by default, longer than clients retry.
    #[serde(default = "idempotency_ttl_ms")]
    pub idempotency_ttl_ms: u64,
    /// How long a key stays held after the post running under it stopped
    /// renewing it (a killed ingest); renewed every third of it while it runs.
    #[serde(default = "idempotency_lock_ms")]
    pub idempotency_lock_ms: u64,
}

fn idempotency_ttl_ms() -> u64 {
    3_600_000
}
fn idempotency_lock_ms() -> u64 {
    30_000
}

fn max_body() -> usize {
    32 * 1024 * 1024
}

fn listen() -> String {
    "0.0.0.0:8080".into()
}
fn events_topic() -> String {
    "cepheid.events".into()
}
fn partitions() -> i32 {
    8
}
fn dead_letter_topic() -> String {
    "cepheid.dead-letter".into()
}
fn group() -> String {
    "cepheid-ingest".into()
}
fn yes() -> bool {
    true
}

impl Default for IngestConfig {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("defaults")
    }
}

/// Why an event is refused.
pub fn check(schema: &Schema, event: &Value, now_ms: i64) -> Result<(), String> {
    let Some(obj) = event.as_object() else {
        return Err(format!("not a JSON object: {}", short(event)));
    };
    match obj.get(&schema.time_field) {
        None | Some(Value::Null) => return Err(format!("missing time field `{}`", schema.time_field)),
        Some(v) if !v.is_i64() => {
            return Err(format!("time field `{}` must be epoch milliseconds (an integer), got {}", schema.time_field, short(v)))
        }
        Some(v) => {
            let t = v.as_i64().unwrap_or_default();
            if schema.max_ahead_ms > 0 && t.saturating_sub(now_ms) > schema.max_ahead_ms as i64 {
                return Err(format!(
                    "time field `{}` is {t}, {} s ahead of ingest's clock ({now_ms}); at most max_ahead_ms = {} is accepted",
                    schema.time_field,
                    (t - now_ms) / 1000,
                    schema.max_ahead_ms
                ));
            }
        }
    }
    for (f, t) in &schema.required {
        let v = f.split('.').try_fold(event, |v, part| v.get(part));
        match v {
            None | Some(Value::Null) => return Err(format!("missing required field `{f}`")),
            Some(v) if !t.accepts(v) => return Err(format!("field `{f}` must be {t:?}, got {}", short(v)).to_lowercase()),
            _ => {}
        }
    }
    Ok(())
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}…", &s[..s.char_indices().nth(77).map(|(i, _)| i).unwrap_or(77)])
    } else {
        s
    }
}

struct Ctx {
    cfg: IngestConfig,
    bus: Bus,
    metrics: Arc<Metrics>,
    telemetry: Arc<Telemetry>,
    ledger: PostLedger,
}

/// Counters served at `/metrics`.
#[derive(Default)]
pub struct Metrics {
    accepted: std::sync::atomic::AtomicU64,
    rejected: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    raw_records: std::sync::atomic::AtomicU64,
    /// Raw records sent again after the bus refused them.
    raw_retries: std::sync::atomic::AtomicU64,
    dead_lettered: std::sync::atomic::AtomicU64,
    /// Events handed to the bus whose acknowledgement is awaited (their request is not answered yet).
    awaiting_ack: std::sync::atomic::AtomicU64,
    /// Lines of posts sent again that an earlier post under the same `Idempotency-Key` stored.
    repeated: std::sync::atomic::AtomicU64,
    /// Posts answered 409: another post under the same key was running.
    key_conflicts: std::sync::atomic::AtomicU64,
    /// Keyed posts whose stored lines could not be recorded (Redis unreachable).
    key_unrecorded: std::sync::atomic::AtomicU64,
}

impl Metrics {
    fn add(c: &std::sync::atomic::AtomicU64, n: u64) {
        c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Prometheus text.
    pub fn prometheus(&self) -> String {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let mut s = String::new();
        for (name, kind, help, v) in [
            ("cepheid_ingest_events_accepted_total", "counter", "Events acknowledged by the bus and answered as accepted.", get(&self.accepted)),
            ("cepheid_ingest_events_rejected_total", "counter", "Events refused (not JSON, schema), over HTTP or from raw topics.", get(&self.rejected)),
            ("cepheid_ingest_events_failed_total", "counter", "Events the bus did not acknowledge (answered 503: retry).", get(&self.failed)),
            ("cepheid_ingest_raw_records_total", "counter", "Records read from raw Kafka topics.", get(&self.raw_records)),
            ("cepheid_ingest_raw_retries_total", "counter", "Raw records sent again after the bus refused them.", get(&self.raw_retries)),
            ("cepheid_ingest_dead_lettered_total", "counter", "Raw records sent to the dead-letter topic.", get(&self.dead_lettered)),
            ("cepheid_ingest_events_awaiting_ack", "gauge", "Posted events handed to the bus and not yet acknowledged.", get(&self.awaiting_ack)),
            ("cepheid_ingest_repeated_lines_total", "counter", "Lines of posts sent again under an Idempotency-Key that an earlier post already stored (not stored again).", get(&self.repeated)),
            ("cepheid_ingest_idempotency_conflicts_total", "counter", "Posts answered 409: another post under the same Idempotency-Key was being stored.", get(&self.key_conflicts)),
            ("cepheid_ingest_idempotency_unrecorded_total", "counter", "Posts under an Idempotency-Key whose stored lines could not be recorded in Redis (sent again, they would be stored twice).", get(&self.key_unrecorded)),
        ] {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        }
        s
    }
}

impl Ctx {
    fn schema(&self, source: &str) -> Option<&Schema> {
        self.cfg.schemas.get(source).or(if self.cfg.accept_unknown_sources { Some(&self.cfg.default_schema) } else { None })
    }

    /// Hands the event to the bus now (events enqueued one after another keep
    /// their order); the returned future is its acknowledgement.
    /// A traced event carries its trace onwards in the `traceparent` header.
    /// `origin`: where a raw record was read (header [`RAW_ORIGIN_HEADER`]).
    async fn enqueue(&self, source: &str, schema: &Schema, text: &str, event: &Value, trace: Option<&Traced>, origin: Option<&str>) -> Result<cepheid_bus::Delivery, cepheid_bus::BusError> {
        let key = partition_key(schema, event);
        let traceparent = trace.map(Traced::traceparent);
        let mut headers: [(&str, &[u8]); 3] = [("cepheid-source", source.as_bytes()), ("", b""), ("", b"")];
        let mut n = 1;
        for h in [traceparent.as_deref().map(|t| (TRACEPARENT, t.as_bytes())), origin.map(|o| (RAW_ORIGIN_HEADER, o.as_bytes()))].into_iter().flatten() {
            headers[n] = h;
            n += 1;
        }
        self.bus.enqueue(&self.cfg.events_topic, None, key.as_deref().map(str::as_bytes), text.as_bytes(), &headers[..n]).await
    }
}

/// The value of the schema's `partition_key` field, rendered (strings as they are).
fn partition_key(schema: &Schema, event: &Value) -> Option<String> {
    schema.partition_key.as_ref().and_then(|k| event.get(k)).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// A frame stays well under a broker's usual record limit (1 MB).
const FRAME_BYTES: usize = 512 * 1024;

/// A frame of posted events being filled: the lines it holds and their traces.
#[derive(Default)]
struct Framing {
    writer: FrameWriter,
    lines: Vec<usize>,
    traces: Vec<Traced>,
    /// The newest event time of the post up to this frame's last event (see
    /// [`FRONTIER_HEADER`]).
    frontier: Option<i64>,
}

#[derive(Deserialize)]
struct SourceQuery {
    source: Option<String>,
}

/// Splits a body into (line number, text) items: a JSON array or NDJSON.
fn items(body: &str) -> Result<Vec<(usize, String)>, String> {
    let trimmed = body.trim_start();
    if trimmed.starts_with('[') {
        let arr: Vec<Box<serde_json::value::RawValue>> =
            serde_json::from_str(trimmed).map_err(|e| format!("body is not a JSON array of events: {e}"))?;
        Ok(arr.into_iter().enumerate().map(|(i, r)| (i + 1, r.get().to_string())).collect())
    } else {
        Ok(body.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| (i + 1, l.trim().to_string())).collect())
    }
}

/// The request header that makes a post safe to send again ([`ledger`]).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// What storing a post's lines came to.
struct Stored {
    /// Lines the bus acknowledged.
    accepted: Vec<usize>,
    rejected: Vec<Value>,
    failed: Vec<Value>,
}

async fn post_events(State(ctx): State<Arc<Ctx>>, Query(q): Query<SourceQuery>, headers: HeaderMap, body: String) -> axum::response::Response {
    let source = q.source.unwrap_or_else(|| "default".into());
    if ctx.schema(&source).is_none() {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": format!("unknown source `{source}`: no schema is registered for it")}))).into_response();
    }
    let items = match items(&body) {
        Ok(i) => i,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e, "accepted": 0}))).into_response(),
    };
    let key = match headers.get(IDEMPOTENCY_KEY).map(|v| v.to_str().map_err(|_| "`Idempotency-Key` may hold visible ASCII characters only".to_string()).and_then(|k| ledger::check_key(k).map(|()| k.to_string()))) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e, "accepted": 0}))).into_response(),
    };
    let Some(key) = key else {
        let stored = store(&ctx, &source, items).await;
        return answer(&source, stored, 0, None);
    };
    let held = match ctx.ledger.begin(&key, ledger::digest(&source, &body)).await {
        Ok(Begin::Held(h)) => h,
        Ok(Begin::Busy) => {
            Metrics::add(&ctx.metrics.key_conflicts, 1);
            let body = json!({"error": format!("a post with `Idempotency-Key` {key} is being stored; send it again once that one is answered"), "accepted": 0});
            return (StatusCode::CONFLICT, [(axum::http::header::RETRY_AFTER, "1")], Json(body)).into_response();
        }
        Ok(Begin::OtherPost) => {
            let body = json!({"error": format!("`Idempotency-Key` {key} was used for a post with another source or body; a post sent again must be the same"), "accepted": 0});
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response();
        }
        Err(e @ LedgerError::Disabled) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e.to_string(), "accepted": 0}))).into_response(),
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": format!("nothing stored, retry: {e}"), "accepted": 0}))).into_response(),
    };
    // The post runs to its end even when its client leaves (a timeout, a
    // dropped connection): what it stores is recorded under the key, so the
    // same post sent again stores only the rest.
    let task = tokio::spawn(async move {
        let keeper = ctx.ledger.keep(&held);
        let already = held.stored.count();
        Metrics::add(&ctx.metrics.repeated, already);
        let items: Vec<(usize, String)> = items.into_iter().filter(|(line, _)| !held.stored.contains(*line as u64)).collect();
        let stored = store(&ctx, &source, items).await;
        let mut backoff = cepheid_state::Backoff::default();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match ctx.ledger.finish(&held, stored.accepted.iter().map(|l| *l as u64)).await {
                Ok(true) => break,
                Ok(false) => {
                    // Recorded, but not renewed in time: another post under the key may have run meanwhile.
                    tracing::warn!("post with `Idempotency-Key` {key}: its lock expired while it ran (Redis unreachable?); a post sent again meanwhile may have stored lines twice");
                    break;
                }
                Err(e) if attempts < 5 => {
                    let wait = backoff.next_wait();
                    tracing::warn!("post with `Idempotency-Key` {key}: recording what it stored: {e}; retrying in {} ms", wait.as_millis());
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    Metrics::add(&ctx.metrics.key_unrecorded, 1);
                    tracing::error!("post with `Idempotency-Key` {key}: what it stored ({} lines) could not be recorded: {e}; sent again, they would be stored twice", stored.accepted.len());
                    break;
                }
            }
        }
        drop(keeper);
        answer(&source, stored, already, Some(&key))
    });
    match task.await {
        Ok(r) => r,
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": format!("storing the post failed: {e}")}))).into_response(),
    }
}

/// The answer to a post: `202` when every line is stored, `400` naming bad
/// lines (the good ones kept), `503` naming lines the bus did not take.
/// `already`: lines earlier posts under the same key stored.
fn answer(source: &str, stored: Stored, already: u64, key: Option<&str>) -> axum::response::Response {
    let Stored { accepted, rejected, failed } = stored;
    let status = if !failed.is_empty() {
        StatusCode::SERVICE_UNAVAILABLE
    } else if !rejected.is_empty() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::ACCEPTED
    };
    let mut body = json!({"source": source, "accepted": accepted.len() as u64 + already, "rejected": rejected, "failed": failed});
    if key.is_some() {
        body["already_accepted"] = json!(already);
    }
    if already > 0 {
        (status, [("idempotent-replayed", "true")], Json(body)).into_response()
    } else {
        (status, Json(body)).into_response()
    }
}

/// Checks a post's lines and stores the good ones, answering only once the
/// bus acknowledged them.
async fn store(ctx: &Ctx, source: &str, items: Vec<(usize, String)>) -> Stored {
    let schema = ctx.schema(source).expect("the source was checked");
    let source = source.to_string();
    let mut rejected = Vec::new();
    let mut good = Vec::new();
    let now = now_ms();
    for (line, text) in items {
        match serde_json::from_str::<Value>(&text) {
            Err(e) => rejected.push(json!({"line": line, "reason": format!("not JSON: {e}")})),
            Ok(v) => match check(schema, &v, now) {
                Ok(()) => good.push((line, text, v)),
                Err(reason) => rejected.push(json!({"line": line, "reason": reason})),
            },
        }
    }
    Metrics::add(&ctx.metrics.rejected, rejected.len() as u64);
    // The events bound for one partition go as frames (one record each, in the
    // order posted: the order the router sees); the answer comes only once the
    // bus acknowledged every frame.
    Metrics::add(&ctx.metrics.awaiting_ack, good.len() as u64);
    let partitions = match ctx.bus.partitions(&ctx.cfg.events_topic).await {
        Ok(n) => n,
        Err(e) => {
            ctx.metrics.awaiting_ack.fetch_sub(good.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Metrics::add(&ctx.metrics.failed, good.len() as u64);
            let failed: Vec<Value> = good.iter().map(|(line, _, _)| json!({"line": line, "reason": format!("not stored, retry: {e}")})).collect();
            return Stored { accepted: Vec::new(), rejected, failed };
        }
    };
    let mut frames: BTreeMap<i32, Framing> = BTreeMap::new();
    let mut sealed: Vec<(i32, Framing)> = Vec::new();
    // The newest event time so far in the post's order.
    let mut newest: Option<i64> = None;
    for (line, text, v) in &good {
        // A sampled event starts a trace; its span ends with the bus's acknowledgement.
        let trace = ctx.telemetry.start_trace("ingest.accept", Kind::Server);
        if let Some(t) = &trace {
            t.attribute("cepheid.source", source.clone());
            t.attribute("cepheid.line", *line as i64);
        }
        let key = partition_key(schema, v);
        let p = key.as_deref().map_or(0, |k| partition_for(k.as_bytes(), partitions));
        let f = frames.entry(p).or_default();
        let traceparent = trace.as_ref().map(Traced::traceparent);
        let time = v.get(&schema.time_field).and_then(Value::as_i64).unwrap_or_default();
        newest = Some(newest.map_or(time, |n| n.max(time)));
        f.frontier = newest;
        f.writer.push(&Entry { key: key.as_deref().unwrap_or_default().as_bytes(), time, source: &source, trace: traceparent.as_deref(), payload: text.as_bytes(), origin: None });
        f.lines.push(*line);
        f.traces.extend(trace);
        if f.writer.bytes() >= FRAME_BYTES {
            sealed.push((p, std::mem::take(f)));
        }
    }
    // A partition's last frame of the post: nothing of the post comes after
    // it there, so it carries the whole post's newest time.
    sealed.extend(frames.into_iter().map(|(p, mut f)| {
        f.frontier = newest;
        (p, f)
    }));
    let mut acks = Vec::with_capacity(sealed.len());
    for (p, f) in sealed {
        let Framing { mut writer, lines, traces, frontier } = f;
        let frontier = frontier.map(|t| serde_json::to_vec(&json!({ &source: t })).expect("a JSON object"));
        let mut headers: Vec<(&str, &[u8])> = vec![(FRAME_HEADER, FRAME_VERSION)];
        headers.extend(frontier.as_deref().map(|f| (FRONTIER_HEADER, f)));
        let sent = ctx.bus.enqueue(&ctx.cfg.events_topic, Some(p), None, &writer.take(), &headers).await;
        acks.push(async move {
            let r = match sent {
                Ok(d) => d.await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = &r {
                for t in &traces {
                    t.error(e.to_string());
                }
            }
            drop(traces);
            (lines, r)
        });
    }
    let results = futures_util::future::join_all(acks).await;
    ctx.metrics.awaiting_ack.fetch_sub(good.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let mut accepted = Vec::new();
    let mut failed = Vec::new();
    for (lines, r) in results {
        match r {
            Ok(()) => accepted.extend(lines),
            Err(e) => failed.extend(lines.iter().map(|line| json!({"line": line, "reason": format!("not stored, retry: {e}")}))),
        }
    }
    accepted.sort_unstable();
    failed.sort_by_key(|f| f["line"].as_u64());
    Metrics::add(&ctx.metrics.accepted, accepted.len() as u64);
    Metrics::add(&ctx.metrics.failed, failed.len() as u64);
    Stored { accepted, rejected, failed }
}

async fn readyz(State(ctx): State<Arc<Ctx>>) -> impl IntoResponse {
    match ctx.bus.partitions(&ctx.cfg.events_topic).await {
        Ok(_) => (StatusCode::OK, "ready"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "events topic unreachable"),
    }
}

/// The HTTP routes (tests can serve them on any listener).
pub fn router(cfg: IngestConfig, bus: Bus, ledger: PostLedger) -> Router {
    routes(Arc::new(Ctx { cfg, bus, metrics: Arc::default(), telemetry: Arc::default(), ledger }))
}

fn routes(ctx: Arc<Ctx>) -> Router {
    let m = ctx.metrics.clone();
    let limit = ctx.cfg.max_body_bytes;
    Router::new()
        .route("/metrics", get(move || {
            let m = m.clone();
            async move { m.prometheus() }
        }))
        .route("/v1/events", post(post_events))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(ctx)
}

/// Runs the HTTP server and the raw-topic consumers until `shutdown`.
pub async fn run(
    cfg: IngestConfig,
    bus: Bus,
    telemetry: Arc<Telemetry>,
    listener: tokio::net::TcpListener,
    ledger: PostLedger,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    bus.create_topic(&cfg.events_topic, cfg.events_partitions).await?;
    bus.create_topic(&cfg.dead_letter_topic, 1).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(Ctx { cfg: cfg.clone(), bus: bus.clone(), metrics: Arc::default(), telemetry: telemetry.clone(), ledger });
    let mut raw = Vec::new();
    if !cfg.raw_topics.is_empty() {
        raw.push(tokio::spawn(consume_raw(ctx.clone(), stop_rx.clone())));
    }
    let app = routes(ctx);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await?;
    for r in raw {
        r.await??;
    }
    telemetry.flush();
    Ok(())
}

/// Raw records forwarded (or dead-lettered) and not yet acknowledged, at most.
const RAW_IN_FLIGHT: usize = 10_000;

/// A raw record handed to the bus: the record (kept to send it again should
/// the bus refuse it) and its acknowledgement.
struct Forwarded {
    msg: cepheid_bus::Message,
    ack: cepheid_bus::Delivery,
    /// Failed sends of it so far.
    failures: u32,
}

/// How long to wait before sending a refused raw record again: 100 ms,
/// doubling with each failure, at most 5 s.
fn retry_wait(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6).saturating_sub(1)).min(5_000))
}

async fn consume_raw(ctx: Arc<Ctx>, mut stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let topics: Vec<&str> = ctx.cfg.raw_topics.keys().map(String::as_str).collect();
    let mut consumer = ctx.bus.subscribe(&ctx.cfg.group, &topics)?;
    // Forwards are handed to the bus one after another (their order kept) and
    // acknowledged in the background; a record's offset is committed once it
    // and everything before it are acknowledged. A forward the bus refuses is
    // sent again (with backoff) before anything after it is committed: a
    // record is never committed past unforwarded, however long the bus refuses.
    let mut in_flight: std::collections::VecDeque<Forwarded> = std::collections::VecDeque::new();
    loop {
        let m = tokio::select! {
            biased;
            _ = stop.changed() => break,
            // Acknowledgements first: they free room and move the commits on.
            r = async { (&mut in_flight.front_mut().expect("non-empty").ack).await }, if !in_flight.is_empty() => {
                if let Err(e) = r {
                    let f = in_flight.front_mut().expect("non-empty");
                    f.failures += 1;
                    Metrics::add(&ctx.metrics.raw_retries, 1);
                    let wait = retry_wait(f.failures);
                    tracing::warn!(
                        "ingest: forwarding raw record {}/{}/{} failed ({e}); sending it again in {wait:?} (nothing after it is committed until it is forwarded)",
                        f.msg.topic, f.msg.partition, f.msg.offset
                    );
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    f.ack = forward(&ctx, &f.msg, false).await;
                    continue;
                }
                // This one and every one after it that is acknowledged already: one commit per partition.
                let mut commits = Vec::new();
                acknowledged(&in_flight.pop_front().expect("non-empty").msg, &mut commits);
                while let Some(f) = in_flight.front_mut() {
                    match futures_util::FutureExt::now_or_never(&mut f.ack) {
                        None => break,
                        Some(Ok(_)) => acknowledged(&in_flight.pop_front().expect("non-empty").msg, &mut commits),
                        Some(Err(e)) => {
                            // Kept for the branch above (a finished future is not polled again).
                            f.ack = Box::pin(async move { Err(e) });
                            break;
                        }
                    }
                }
                for (topic, partition, next) in commits {
                    consumer.commit(&topic, partition, next)?;
                }
                continue;
            }
            m = consumer.recv(), if in_flight.len() < RAW_IN_FLIGHT => m,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) if e.is_transient() => {
                tracing::warn!("ingest: bus: {e}; retrying");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        Metrics::add(&ctx.metrics.raw_records, 1);
        let ack = forward(&ctx, &m, true).await;
        in_flight.push_back(Forwarded { msg: m, ack, failures: 0 });
    }
    // Stopping: what was handed over is awaited and committed up to the first
    // record of each partition that was not forwarded (it is read again after
    // a restart, and so is everything after it).
    let mut commits = Vec::new();
    let mut stuck: Vec<(String, i32)> = Vec::new();
    while let Some(mut f) = in_flight.pop_front() {
        let at = (f.msg.topic.clone(), f.msg.partition);
        if stuck.contains(&at) {
            continue;
        }
        match (&mut f.ack).await {
            Ok(_) => acknowledged(&f.msg, &mut commits),
            Err(e) => {
                tracing::warn!("ingest: stopping: raw record {}/{}/{} not forwarded ({e}); it is read again after a restart", f.msg.topic, f.msg.partition, f.msg.offset);
                stuck.push(at);
            }
        }
    }
    for (topic, partition, next) in commits {
        consumer.commit(&topic, partition, next)?;
    }
    Ok(())
}

/// Hands raw record `m` to the bus: as an event of its topic's source when it
/// passes the source's schema, else to the dead-letter topic with the reason.
/// `first`: its first send (counted in the metrics; a send again is not).
/// A send the bus refuses at once comes back as a failed acknowledgement.
async fn forward(ctx: &Arc<Ctx>, m: &cepheid_bus::Message, first: bool) -> cepheid_bus::Delivery {
    let source = ctx.cfg.raw_topics.get(&m.topic).cloned().unwrap_or_default();
    let text = String::from_utf8_lossy(&m.payload).trim().to_string();
    let verdict = match (ctx.schema(&source), serde_json::from_str::<Value>(&text)) {
        (None, _) => Err(format!("no schema for source `{source}`")),
        (_, Err(e)) => Err(format!("not JSON: {e}")),
        (Some(schema), Ok(v)) => check(schema, &v, now_ms()).map(|_| (schema, v)),
    };
    let ack = match verdict {
        Ok((schema, v)) => {
            // A raw record that carries a trace continues it; others may start one.
            let trace = ctx
                .telemetry
                .continue_trace("ingest.accept", Kind::Consumer, m.header(TRACEPARENT))
                .or_else(|| ctx.telemetry.start_trace("ingest.accept", Kind::Consumer));
            // The first send says where the record was read: should ingest stop before
            // committing past it, the record is forwarded again after the restart, and
            // shards drop the second copy by this origin. A send again after a refusal
            // does not: records read after it may have been written before it, and a
            // shard would take it for a repeat of an earlier position (if the refused
            // send was written after all, it is taken twice).
            let origin = first.then(|| format!("{}/{}/{}", m.topic, m.partition, m.offset));
            // A full producer queue (or a partition count not yet known): wait and
            // hand it over again, before anything read after it — taken for a failed
            // send, the records after it would be written first.
            // (Up to a minute; then it counts as a failed send.)
            let (mut wait, give_up) = (Duration::from_millis(5), tokio::time::Instant::now() + Duration::from_secs(60));
            let sent = loop {
                match ctx.enqueue(&source, schema, &text, &v, trace.as_ref(), origin.as_deref()).await {
                    Err(e) if e.is_transient() && tokio::time::Instant::now() < give_up => {
                        tracing::debug!("ingest: raw record {}/{}/{} not handed to the bus yet ({e}); again in {wait:?}", m.topic, m.partition, m.offset);
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_millis(500));
                    }
                    r => break r,
                }
            };
            sent.map(|d| -> cepheid_bus::Delivery {
                let ctx = ctx.clone();
                Box::pin(async move {
                    let r = d.await;
                    if r.is_ok() {
                        Metrics::add(&ctx.metrics.accepted, 1);
                    }
                    drop(trace);
                    r
                })
            })
        }
        Err(reason) => {
            if first {
                Metrics::add(&ctx.metrics.rejected, 1);
                Metrics::add(&ctx.metrics.dead_lettered, 1);
            }
            ctx.bus
                .enqueue(
                    &ctx.cfg.dead_letter_topic,
                    None,
                    None,
                    &m.payload,
                    &[("cepheid-reason", reason.as_bytes()), (RAW_ORIGIN_HEADER, format!("{}/{}/{}", m.topic, m.partition, m.offset).as_bytes())],
                )
                .await
        }
    };
    match ack {
        Ok(a) => a,
        // The producer's queue is full or the broker refused it: as a failed acknowledgement.
        Err(e) => Box::pin(async move { Err(e) }),
    }
}

/// A forwarded raw record was acknowledged: its partition's commit moves after it.
fn acknowledged(m: &cepheid_bus::Message, commits: &mut Vec<(String, i32, i64)>) {
    match commits.iter_mut().find(|(t, p, _)| *t == m.topic && *p == m.partition) {
        Some(c) => c.2 = m.offset + 1,
        None => commits.push((m.topic.clone(), m.partition, m.offset + 1)),
    }
}

/// Ingest's wall clock, ms since the epoch (only to refuse events far ahead of it).
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
