//! Targets: how one rendered alert reaches one destination.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cepheid_types::Clock;
use serde_json::{json, Value};

use crate::config::{FeishuFormat, TargetConfig};
use crate::sign::{feishu_sign, webhook_sign};

/// One alert for one target.
#[derive(Clone, Debug)]
pub struct Job {
    pub target: String,
    pub match_id: String,
    pub rule_id: String,
    pub title: Arc<str>,
    pub message: Arc<str>,
    /// The match record as JSON.
    pub record: Arc<Value>,
    pub attempt: u32,
}

/// A failed send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendError {
    /// Worth another attempt (rate limited, network, 5xx).
    pub retryable: bool,
    pub message: String,
}

impl SendError {
    fn retry(m: impl Into<String>) -> Self {
        SendError { retryable: true, message: m.into() }
    }
    fn fail(m: impl Into<String>) -> Self {
        SendError { retryable: false, message: m.into() }
    }
}

/// Feishu's limit on a request body.
pub const FEISHU_MAX_BODY: usize = 20 * 1024;
const CUT: &str = "\n…(message cut: over the 20 KB limit)";

pub enum Target {
    Feishu { cfg: TargetConfig, http: reqwest::Client },
    Webhook { cfg: TargetConfig, http: reqwest::Client },
    Kafka { bus: cepheid_bus::Bus, topic: String },
    File { out: Mutex<std::io::BufWriter<std::fs::File>> },
    Log,
}

impl Target {
    pub fn build(cfg: &TargetConfig, bus: Option<&cepheid_bus::Bus>) -> std::io::Result<Target> {
        Ok(match cfg {
            TargetConfig::Kafka { topic, .. } => match bus {
                Some(b) => Target::Kafka { bus: b.clone(), topic: topic.clone() },
                None => return Err(std::io::Error::other(format!("kafka target `{topic}` needs a bus (Kafka) to be configured"))),
            },
            TargetConfig::Feishu { timeout_ms, .. } | TargetConfig::Webhook { timeout_ms, .. } => {
                let http = reqwest::Client::builder().timeout(Duration::from_millis(*timeout_ms)).build().map_err(std::io::Error::other)?;
                if matches!(cfg, TargetConfig::Feishu { .. }) {
                    Target::Feishu { cfg: cfg.clone(), http }
                } else {
                    Target::Webhook { cfg: cfg.clone(), http }
                }
            }
            TargetConfig::File { path } => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                Target::File { out: Mutex::new(std::io::BufWriter::new(f)) }
            }
            TargetConfig::Log {} => Target::Log,
        })
    }

    pub async fn send(&self, job: &Job, clock: &dyn Clock) -> Result<(), SendError> {
        match self {
            Target::Feishu { cfg, http } => feishu(cfg, http, job, clock).await,
            Target::Webhook { cfg, http } => webhook(cfg, http, job, clock).await,
            Target::Kafka { bus, topic } => {
                let body = json!({"target": job.target, "message": &*job.message, "match": &*job.record}).to_string();
                bus.send(topic, None, Some(job.match_id.as_bytes()), body.as_bytes(), &[])
                    .await
                    .map(|_| ())
                    .map_err(|e| SendError { retryable: e.is_transient(), message: e.to_string() })
            }
            Target::File { out } => {
                let line = json!({"target": job.target, "message": &*job.message, "match": &*job.record}).to_string();
                let mut w = out.lock().unwrap();
                w.write_all(line.as_bytes()).and_then(|_| w.write_all(b"\n")).and_then(|_| w.flush()).map_err(|e| SendError::retry(e.to_string()))
            }
            Target::Log => {
                // The process's log (stderr; JSON lines when the service logs JSON).
                tracing::info!(target: "cepheid_alert", rule_id = %job.rule_id, match_id = %job.match_id, "[alert {}] {}", job.rule_id, job.message);
                Ok(())
            }
        }
    }
}

/// The Feishu request body (text or card), cut to the size limit.
pub fn feishu_body(cfg: &TargetConfig, job: &Job, timestamp: i64) -> Value {
    let TargetConfig::Feishu { secret, format, severity, link, .. } = cfg else { unreachable!() };
    let build = |text: &str| {
        let mut body = match format {
            FeishuFormat::Text => json!({"msg_type": "text", "content": {"text": text}}),
            FeishuFormat::Card => {
                let mut elements = vec![json!({"tag": "div", "text": {"tag": "lark_md", "content": text}})];
                if let Some(l) = link {
                    elements.push(json!({"tag": "action", "actions": [{"tag": "button", "text": {"tag": "plain_text", "content": "Open"}, "url": l, "type": "primary"}]}));
                }
                json!({"msg_type": "interactive", "card": {
                    "config": {"wide_screen_mode": true},
                    "header": {"title": {"tag": "plain_text", "content": &*job.title}, "template": severity.color()},
                    "elements": elements
                }})
            }
        };
        if let Some(s) = secret {
            body["timestamp"] = json!(timestamp.to_string());
            body["sign"] = json!(feishu_sign(timestamp, &s.0));
        }
        body
    };
    let mut text: String = job.message.to_string();
    let mut body = build(&text);
    while body.to_string().len() > FEISHU_MAX_BODY && !text.is_empty() {
        let over = body.to_string().len() - FEISHU_MAX_BODY + CUT.len() + 16;
        let mut keep = text.len().saturating_sub(over.max(64));
        while !text.is_char_boundary(keep) {
            keep -= 1;
        }
        text.truncate(keep);
        let cut = format!("{text}{CUT}");
        body = build(&cut);
        if body.to_string().len() <= FEISHU_MAX_BODY {
            break;
        }
    }
    body
}

async fn feishu(cfg: &TargetConfig, http: &reqwest::Client, job: &Job, clock: &dyn Clock) -> Result<(), SendError> {
    let TargetConfig::Feishu { url, .. } = cfg else { unreachable!() };
    let body = feishu_body(cfg, job, clock.now() / 1000);
    let resp = http.post(url).json(&body).send().await.map_err(|e| SendError::retry(format!("network: {e}")))?;
    let status = resp.status();
    if status.is_server_error() || status.as_u16() == 429 {
        return Err(SendError::retry(format!("HTTP {status}")));
    }
    let v: Value = resp.json().await.map_err(|e| SendError::retry(format!("HTTP {status}, unreadable answer: {e}")))?;
    let code = v.get("code").or_else(|| v.get("StatusCode")).and_then(|c| c.as_i64()).unwrap_or(-1);
    let msg = v.get("msg").or_else(|| v.get("StatusMessage")).and_then(|m| m.as_str()).unwrap_or("");
    match code {
        0 => Ok(()),
        // Frequency limited: back off and try again.
        11232 => Err(SendError::retry(format!("feishu code 11232 (frequency limited): {msg}"))),
        19021 => Err(SendError::fail(format!("feishu code 19021 (bad signature or clock skew): {msg}"))),
        9499 => Err(SendError::fail(format!("feishu code 9499 (bad request): {msg}"))),
        19024 => Err(SendError::fail(format!("feishu code 19024: {msg}"))),
        other => Err(SendError::fail(format!("feishu code {other}: {msg}"))),
    }
}

async fn webhook(cfg: &TargetConfig, http: &reqwest::Client, job: &Job, clock: &dyn Clock) -> Result<(), SendError> {
    let TargetConfig::Webhook { url, secret, headers, .. } = cfg else { unreachable!() };
    let body = json!({"match": &*job.record, "message": &*job.message}).to_string();
    let ts = clock.now() / 1000;
    let mut req = http.post(url).header("content-type", "application/json").header("x-cepheid-timestamp", ts.to_string());
    if let Some(s) = secret {
        req = req.header("x-cepheid-signature", webhook_sign(&s.0, ts, body.as_bytes()));
    }
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let resp = req.body(body).send().await.map_err(|e| SendError::retry(format!("network: {e}")))?;
    let s = resp.status();
    if s.is_success() {
        Ok(())
    } else if s.is_server_error() || s.as_u16() == 429 {
        Err(SendError::retry(format!("HTTP {s}")))
    } else {
        Err(SendError::fail(format!("HTTP {s}")))
    }
}
