//! Posts sent again under an `Idempotency-Key`, with the real Redis: a post
//! the broker took only in part, sent again, stores only the rest; a post
//! whose client left is still stored, once; a post running under a key is
//! not run twice at once. The broker faults (a refused produce request, a
//! slow broker) are librdkafka's mock cluster's: the real broker here cannot
//! be made to have them.

use std::time::Duration;

use cepheid_bus::frame::{self, FRAME_HEADER};
use cepheid_bus::{partition_for, Bus};
use cepheid_ingest::ledger::PostLedger;
use cepheid_ingest::IngestConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::Value;

mod common;

const REDIS: &str = "redis://127.0.0.1:6379";

fn config(tag: &str) -> IngestConfig {
    serde_json::from_value(serde_json::json!({
        "listen": "127.0.0.1:0",
        "events_topic": format!("events-{tag}"),
        "dead_letter_topic": format!("dead-{tag}"),
        "events_partitions": 2,
        "group": format!("ingest-{tag}"),
        "schemas": {"clickstream": {"time_field": "eventTime", "partition_key": "userId",
                    "required": {"eventType": "string", "userId": "integer"}}},
        "accept_unknown_sources": false,
        "idempotency_lock_ms": 3000
    }))
    .unwrap()
}

struct Ingest {
    server: common::Server,
    bus: Bus,
    cfg: IngestConfig,
    prefix: String,
    mock: Option<MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
}

/// Ingest on a mock cluster of two brokers, one partition of the events topic led by each.
async fn on_mock_cluster(tag: &str) -> Ingest {
    let mock = MockCluster::new(2).unwrap();
    let cfg = config(tag);
    // The mock broker cannot create topics through the admin API: provisioned beforehand.
    mock.create_topic(&cfg.events_topic, 2, 1).unwrap();
    mock.create_topic(&cfg.dead_letter_topic, 1, 1).unwrap();
    mock.partition_leader(&cfg.events_topic, 0, Some(1)).unwrap();
    mock.partition_leader(&cfg.events_topic, 1, Some(2)).unwrap();
    let bus = Bus::kafka(&cepheid_bus::KafkaConfig { bootstrap: mock.bootstrap_servers(), properties: vec![] }).unwrap();
    let prefix = format!("cepheid-test-ingest-{tag}-{}", std::process::id());
    let ledger = PostLedger::redis(REDIS, &prefix, cfg.idempotency_ttl_ms, cfg.idempotency_lock_ms).unwrap();
    let server = common::start(cfg.clone(), bus.clone(), ledger).await;
    Ingest { server, bus, cfg, prefix, mock: Some(mock) }
}

/// Ingest on the memory bus.
async fn on_memory(tag: &str, ledger: PostLedger) -> Ingest {
    let (cfg, bus) = (config(tag), Bus::memory());
    let server = common::start(cfg.clone(), bus.clone(), ledger).await;
    Ingest { server, bus, cfg, prefix: format!("cepheid-test-ingest-{tag}-{}", std::process::id()), mock: None }
}

impl Ingest {
    async fn post(&self, http: &reqwest::Client, key: Option<&str>, body: &str) -> reqwest::Result<(u16, Value, bool)> {
        let mut req = http.post(format!("{}/v1/events?source=clickstream", self.server.url)).body(body.to_string());
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let replayed = r.headers().get("idempotent-replayed").is_some();
        Ok((status, r.json().await?, replayed))
    }

    /// Every event time on the events topic, until one of each `until` was read
    /// in each partition (a post written after everything else: nothing older
    /// comes after it).
    async fn events(&self, until: &[i64]) -> Vec<i64> {
        let mut c = self.bus.subscribe(&format!("reader-{}", self.prefix), &[self.cfg.events_topic.as_str()]).unwrap();
        let mut got = Vec::new();
        let mut seen = 0;
        while seen < until.len() {
            let m = tokio::time::timeout(Duration::from_secs(60), c.recv()).await.expect("events").unwrap();
            assert!(m.header(FRAME_HEADER).is_some());
            for e in frame::entries(&m.payload) {
                let t = e.unwrap().time;
                if until.contains(&t) {
                    seen += 1;
                } else {
                    got.push(t);
                }
            }
        }
        got.sort();
        got
    }

    async fn stop(self) {
        self.server.stop().await;
        // Only the mock-cluster runs remember posts in the test Redis.
        if self.mock.is_some() {
            cepheid_state::delete_prefix(REDIS, &self.prefix).await.unwrap();
        }
    }
}

/// `n` events of users spread over both partitions, event time = line number.
fn body(n: i64) -> String {
    let lines: Vec<String> = (1..=n).map(|i| format!(r#"{{"eventTime": {i}, "eventType": "view", "userId": {i}}}"#)).collect();
    let partitions: std::collections::BTreeSet<i32> = (1..=n).map(|i| partition_for(i.to_string().as_bytes(), 2)).collect();
    assert_eq!(partitions.len(), 2, "the post must go to both partitions");
    lines.join("\n")
}

/// A marker event for each partition, posted without a key after everything else.
fn markers() -> (String, Vec<i64>) {
    let mut lines = Vec::new();
    let mut times = Vec::new();
    for p in 0..2 {
        let user = (1000..).find(|u: &i64| partition_for(u.to_string().as_bytes(), 2) == p).unwrap();
        let t = 1_000_000 + p as i64;
        lines.push(format!(r#"{{"eventTime": {t}, "eventType": "marker", "userId": {user}}}"#));
        times.push(t);
    }
    (lines.join("\n"), times)
}

#[tokio::test]
async fn a_post_stored_in_part_sent_again_stores_the_rest_once() {
    let ingest = on_mock_cluster("part").await;
    let http = reqwest::Client::new();
    let n = 12;
    let body = body(n);
    // The next produce request is refused: one partition's frame, the other's is written.
    ingest.mock.as_ref().unwrap().request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD]);
    let (status, v, _) = ingest.post(&http, Some("order-7"), &body).await.unwrap();
    assert_eq!(status, 503, "{v}");
    let (first, failed) = (v["accepted"].as_u64().unwrap(), v["failed"].as_array().unwrap().len() as u64);
    assert!(first >= 1 && failed >= 1 && first + failed == n as u64, "one partition's frame taken, the other's refused: {v}");
    assert_eq!(v["already_accepted"], 0);

    // Sent again under the same key: only the refused lines are stored.
    let (status, v, replayed) = ingest.post(&http, Some("order-7"), &body).await.unwrap();
    assert_eq!(status, 202, "{v}");
    assert_eq!((v["accepted"].as_u64(), v["already_accepted"].as_u64()), (Some(n as u64), Some(first)), "{v}");
    assert!(replayed, "the answer says lines were stored before");
    // And again: nothing left to store.
    let (status, v, _) = ingest.post(&http, Some("order-7"), &body).await.unwrap();
    assert_eq!(status, 202, "{v}");
    assert_eq!((v["accepted"].as_u64(), v["already_accepted"].as_u64()), (Some(n as u64), Some(n as u64)), "{v}");

    // The same key for another body: refused, naming the key.
    let (status, v, _) = ingest.post(&http, Some("order-7"), &body.replace("view", "cart")).await.unwrap();
    assert_eq!(status, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("order-7"), "{v}");
    // A key that is not one.
    let (status, v, _) = ingest.post(&http, Some("order 7"), &body).await.unwrap();
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("visible ASCII"), "{v}");

    let (marker_body, marker_times) = markers();
    assert_eq!(ingest.post(&http, None, &marker_body).await.unwrap().0, 202);
    let got = ingest.events(&marker_times).await;
    assert_eq!(got, (1..=n).collect::<Vec<_>>(), "every line stored exactly once");
    ingest.stop().await;
}

#[tokio::test]
async fn a_post_whose_client_left_is_stored_once() {
    let ingest = on_mock_cluster("left").await;
    let n = 8;
    let body = body(n);
    // A slow broker: every answer takes 5 s.
    ingest.mock.as_ref().unwrap().broker_round_trip_time(-1, Duration::from_secs(5)).unwrap();
    // The client leaves (its connection dropped) once its post holds the key,
    // long before the broker answers.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/events?source=clickstream", ingest.server.url);
    let first = tokio::spawn(http.post(url).header("Idempotency-Key", "batch-1").body(body.clone()).send());
    let lock = format!("{}:ingest:post:{{batch-1}}:lock", ingest.prefix);
    let mut redis = redis::Client::open(REDIS).unwrap().get_multiplexed_async_connection().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !redis::cmd("EXISTS").arg(&lock).query_async::<bool>(&mut redis).await.unwrap() {
        assert!(tokio::time::Instant::now() < deadline, "the first post never took the key");
        tokio::task::yield_now().await;
    }
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    // Sent again at once: the first post is still being stored, under the key.
    let (status, v, _) = ingest.post(&http, Some("batch-1"), &body).await.unwrap();
    assert_eq!(status, 409, "the first post still holds the key: {v}");
    assert!(v["error"].as_str().unwrap().contains("batch-1"), "{v}");
    // Sent again until answered (as a client honouring Retry-After would).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let v = loop {
        let (status, v, _) = ingest.post(&http, Some("batch-1"), &body).await.unwrap();
        if status != 409 {
            assert_eq!(status, 202, "{v}");
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "the key was never given up");
        tokio::task::yield_now().await;
    };
    // The first post, although its client left, stored everything.
    assert_eq!((v["accepted"].as_u64(), v["already_accepted"].as_u64()), (Some(n as u64), Some(n as u64)), "{v}");
    ingest.mock.as_ref().unwrap().broker_round_trip_time(-1, Duration::ZERO).unwrap();
    let (marker_body, marker_times) = markers();
    assert_eq!(ingest.post(&http, None, &marker_body).await.unwrap().0, 202);
    assert_eq!(ingest.events(&marker_times).await, (1..=n).collect::<Vec<_>>(), "every line stored exactly once");
    ingest.stop().await;
}

#[tokio::test]
async fn keyed_posts_without_redis_are_refused_and_others_stored() {
    let http = reqwest::Client::new();
    let body = body(4);
    // Redis unreachable (nothing listens there): keyed posts get 503 naming it, nothing stored.
    let ingest = on_memory("down", PostLedger::redis("redis://127.0.0.1:1", "cepheid-test-ingest-down", 60_000, 3_000).unwrap()).await;
    let (status, v, _) = ingest.post(&http, Some("k1"), &body).await.unwrap();
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("redis"), "{v}");
    assert_eq!(v["accepted"], 0);
    let (status, v, _) = ingest.post(&http, None, &body).await.unwrap();
    assert_eq!(status, 202, "posts without a key do not need Redis: {v}");
    let (marker_body, marker_times) = markers();
    assert_eq!(ingest.post(&http, None, &marker_body).await.unwrap().0, 202);
    assert_eq!(ingest.events(&marker_times).await, vec![1, 2, 3, 4], "only the unkeyed post was stored");
    ingest.stop().await;

    // No Redis configured at all: a keyed post is refused as such.
    let ingest = on_memory("none", PostLedger::disabled()).await;
    let (status, v, _) = ingest.post(&http, Some("k1"), &body).await.unwrap();
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("need Redis"), "{v}");
    ingest.stop().await;
}
