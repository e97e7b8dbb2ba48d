//! Cepheid's telemetry: traces that follow an event through the services,
//! and structured logs.
//!
//! **Traces.** Ingest starts a trace for a sampled share of the events it
//! accepts ([`TelemetrySettings::sample_ratio`]) and puts its W3C
//! `traceparent` in the header of the record it sends; the router, the shard
//! and the notifier each continue the trace a record carries (a span of their
//! own, child of the sender's) and pass it on in the records they send. So one
//! event's path — ingest → router → shard → notifier — is one trace. Spans are
//! exported over OTLP/HTTP (JSON) to [`TelemetrySettings::otlp_endpoint`] in
//! batches by a background thread; without an endpoint nothing is recorded
//! and a record without a `traceparent` costs one header lookup.
//!
//! Each service holds its own [`Telemetry`] (its own provider and service
//! name), not a process-wide global, so that several services can run in one
//! process (the embedded mode, the tests).
//!
//! **Logs.** [`init_logs`] installs a `tracing` subscriber writing to stderr,
//! as text or as JSON lines; log lines about a traced record carry its
//! `trace_id` field.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider};
use serde::Deserialize;

/// The record header that carries a trace from one service to the next.
pub const TRACEPARENT: &str = "traceparent";

/// `[telemetry]` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP/HTTP base URL of a collector (e.g. `http://otel-collector:4318`);
    /// spans go to `{otlp_endpoint}/v1/traces`. Unset: no traces.
    pub otlp_endpoint: Option<String>,
    /// Share of ingested events that start a trace, 0 to 1 (1 = every event).
    pub sample_ratio: f64,
    /// How often finished spans are sent, in milliseconds.
    pub export_interval_ms: u64,
    /// `text` or `json` (one JSON object per line).
    pub log_format: LogFormat,
    /// Which logs to write, in `tracing` filter syntax (`info`, `warn,cepheid_bus=debug`).
    pub log_level: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings { otlp_endpoint: None, sample_ratio: 0.001, export_interval_ms: 1000, log_format: LogFormat::Text, log_level: "info".into() }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.sample_ratio must be between 0 and 1, not {0}")]
    Ratio(f64),
    #[error("telemetry.otlp_endpoint `{0}`: {1}")]
    Exporter(String, String),
    #[error("telemetry.log_level `{0}`: {1}")]
    LogLevel(String, String),
}

/// One service's tracing: a tracer exporting over OTLP, or nothing.
#[derive(Default)]
pub struct Telemetry {
    inner: Option<Inner>,
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// Every `every`-th call of [`Telemetry::start_trace`] starts one.
    every: u64,
    calls: AtomicU64,
}

impl Telemetry {
    /// No traces (what tests and the embedded mode use unless told otherwise).
    pub fn disabled() -> Telemetry {
        Telemetry::default()
    }

    /// Tracing for `service` as configured (disabled without an endpoint).
    pub fn new(service: &str, s: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
        if !(0.0..=1.0).contains(&s.sample_ratio) || s.sample_ratio.is_nan() {
            return Err(TelemetryError::Ratio(s.sample_ratio));
        }
        let Some(endpoint) = s.otlp_endpoint.as_deref().filter(|e| !e.trim().is_empty()) else {
            return Ok(Telemetry::disabled());
        };
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(url)
            .with_http_client(BlockingClient::new().map_err(|e| TelemetryError::Exporter(endpoint.to_string(), e))?)
            .build()
            .map_err(|e| TelemetryError::Exporter(endpoint.to_string(), e.to_string()))?;
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(BatchConfigBuilder::default().with_scheduled_delay(Duration::from_millis(s.export_interval_ms.max(10))).build())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_resource(opentelemetry_sdk::Resource::builder_empty().with_service_name(service.to_string()).build())
            .build();
        let tracer = provider.tracer("cepheid");
        let every = if s.sample_ratio <= 0.0 { u64::MAX } else { (1.0 / s.sample_ratio).round().max(1.0) as u64 };
        Ok(Telemetry { inner: Some(Inner { provider, tracer, every, calls: AtomicU64::new(0) }) })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Starts a trace for a sampled share of calls (a new event).
    pub fn start_trace(&self, name: &'static str, kind: SpanKind) -> Option<Traced> {
        let inner = self.inner.as_ref()?;
        if inner.calls.fetch_add(1, Ordering::Relaxed) % inner.every != 0 {
            return None;
        }
        let span = inner.tracer.span_builder(name).with_kind(kind).start_with_context(&inner.tracer, &Context::new());
        Some(Traced { cx: Context::new().with_span(span) })
    }

    /// Continues the trace a received record carries in its `traceparent` header.
    pub fn continue_trace(&self, name: &'static str, kind: SpanKind, traceparent: Option<&[u8]>) -> Option<Traced> {
        let inner = self.inner.as_ref()?;
        let parent = parse(traceparent?)?;
        let span = inner.tracer.span_builder(name).with_kind(kind).start_with_context(&inner.tracer, &parent);
        Some(Traced { cx: Context::new().with_span(span) })
    }

    /// Sends what is still buffered (at shutdown).
    pub fn flush(&self) {
        if let Some(i) = &self.inner {
            let _ = i.provider.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(i) = &self.inner {
            let _ = i.provider.shutdown();
        }
    }
}

/// The parent context a `traceparent` value names (None when it is not one).
fn parse(traceparent: &[u8]) -> Option<Context> {
    struct One<'a>(&'a str);
    impl Extractor for One<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == TRACEPARENT).then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec![TRACEPARENT]
        }
    }
    let cx = TraceContextPropagator::new().extract(&One(std::str::from_utf8(traceparent).ok()?));
    cx.span().span_context().is_valid().then_some(cx)
}

/// A span in progress; ends when dropped.
pub struct Traced {
    cx: Context,
}

impl Traced {
    /// The `traceparent` header value for records sent on behalf of this span.
    pub fn traceparent(&self) -> String {
        let sc = self.cx.span().span_context().clone();
        format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8())
    }

    /// The trace id, for log lines (`trace_id` field).
    pub fn trace_id(&self) -> String {
        self.cx.span().span_context().trace_id().to_string()
    }

    pub fn attribute(&self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        self.cx.span().set_attribute(KeyValue::new(key, value));
    }

    /// Marks the span failed, with the reason.
    pub fn error(&self, reason: impl Into<String>) {
        self.cx.span().set_status(opentelemetry::trace::Status::error(reason.into()));
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// Exports with a blocking client: the batch processor calls it on its own
/// thread, outside any async runtime.
#[derive(Debug)]
struct BlockingClient(reqwest::blocking::Client);

impl BlockingClient {
    /// Built on a thread of its own: a blocking client starts (and, dropped, stops)
    /// a runtime, which must not happen inside the service's async runtime.
    fn new() -> Result<BlockingClient, String> {
        std::thread::spawn(|| reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().map(BlockingClient).map_err(|e| e.to_string()))
            .join()
            .map_err(|_| "building the HTTP client panicked".to_string())?
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for BlockingClient {
    async fn send_bytes(&self, request: opentelemetry_http::Request<opentelemetry_http::Bytes>) -> Result<opentelemetry_http::Response<opentelemetry_http::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let mut req = self.0.request(parts.method, parts.uri.to_string()).body(body.to_vec());
        for (k, v) in parts.headers.iter() {
            req = req.header(k, v);
        }
        let resp = req.send()?;
        let status = resp.status();
        let body = resp.bytes()?;
        Ok(opentelemetry_http::Response::builder().status(status).body(body)?)
    }
}

/// What a service's `main` does: its logs as configured, and its tracing.
pub fn init(service: &str, s: &TelemetrySettings) -> Result<std::sync::Arc<Telemetry>, TelemetryError> {
    init_logs(s)?;
    let t = Telemetry::new(service, s)?;
    if let Some(e) = &s.otlp_endpoint {
        tracing::info!(service, endpoint = %e, sample_ratio = s.sample_ratio, "exporting traces over OTLP");
    }
    Ok(std::sync::Arc::new(t))
}

/// Installs the process's log output (stderr) as configured. Call once, from
/// a service's `main`.
pub fn init_logs(s: &TelemetrySettings) -> Result<(), TelemetryError> {
    // Already installed (a second service in the same process): keep the first.
    let _ = tracing::subscriber::set_global_default(subscriber(s, std::io::stderr)?);
    Ok(())
}

/// The log subscriber `init_logs` installs, writing to `writer`.
fn subscriber<W>(s: &TelemetrySettings, writer: W) -> Result<Box<dyn tracing::Subscriber + Send + Sync>, TelemetryError>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_new(&s.log_level).map_err(|e| TelemetryError::LogLevel(s.log_level.clone(), e.to_string()))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    Ok(match s.log_format {
        LogFormat::Json => Box::new(builder.json().flatten_event(true).with_current_span(false).with_span_list(false).finish()),
        LogFormat::Text => Box::new(builder.with_ansi(false).finish()),
    })
}

pub use opentelemetry::trace::SpanKind as Kind;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parse(tp.as_bytes()).unwrap();
        assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(parse(b"not a traceparent").is_none());
        assert!(parse(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none(), "an all-zero trace id is invalid");
    }

    #[test]
    fn without_an_endpoint_nothing_is_traced() {
        let t = Telemetry::new("x", &TelemetrySettings::default()).unwrap();
        assert!(!t.enabled());
        assert!(t.start_trace("a", SpanKind::Server).is_none());
        assert!(t.continue_trace("b", SpanKind::Consumer, Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")).is_none());
    }

    #[test]
    fn json_logs_are_one_object_per_line_with_the_trace_id() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let b2 = buf.clone();
        let s = TelemetrySettings { log_format: LogFormat::Json, log_level: "info".into(), ..Default::default() };
        let sub = subscriber(&s, move || b2.clone()).unwrap();
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(partition = 3, trace_id = "4bf92f3577b34da6a3ce929d0e0e4736", "late event dropped");
            tracing::debug!("not at info");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["message"], "late event dropped");
        assert_eq!(lines[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(lines[0]["partition"], 3);
        let bad = TelemetrySettings { log_level: "info,=[".into(), ..Default::default() };
        assert!(matches!(subscriber(&bad, std::io::sink), Err(TelemetryError::LogLevel(..))));
    }

    #[test]
    fn a_ratio_out_of_range_is_refused() {
        let s = TelemetrySettings { sample_ratio: 1.5, ..Default::default() };
        assert!(matches!(Telemetry::new("x", &s), Err(TelemetryError::Ratio(_))));
    }
}
