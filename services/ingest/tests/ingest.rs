//! The ingest service in-process, on the in-memory bus and (when
//! `CEPHEID_KAFKA_BOOTSTRAP` names a broker) on Kafka.

use cepheid_bus::frame::{self, FRAME_HEADER};
use cepheid_bus::{partition_for, Bus};
use cepheid_ingest::ledger::PostLedger;
use cepheid_ingest::IngestConfig;
use serde_json::Value;

mod common;

fn config(tag: &str) -> IngestConfig {
    let mut cfg: IngestConfig = serde_json::from_value(serde_json::json!({
        "events_topic": format!("events-{tag}"),
        "dead_letter_topic": format!("dead-{tag}"),
        "events_partitions": 2,
        "group": format!("ingest-{tag}"),
        "raw_topics": {format!("click_stream1-{tag}"): "clickstream"},
        "schemas": {"clickstream": {"time_field": "eventTime", "partition_key": "userId",
                    "required": {"eventType": "string", "userId": "integer"}}},
        "accept_unknown_sources": false
    }))
    .unwrap();
    cfg.listen = "127.0.0.1:0".into();
    cfg
}

async fn scenario(bus: Bus, tag: &str) {
    let cfg = config(tag);
    let raw = format!("click_stream1-{tag}");
    bus.create_topic(&raw, 1).await.unwrap();
    // Answering once its topics are created.
    let server = common::start(cfg.clone(), bus.clone(), PostLedger::disabled()).await;
    let url = server.url.clone();
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("{url}/healthz")).send().await.unwrap().status(), 200);

    // NDJSON with one bad line: 400 names it; the good ones are kept.
    let body = [
        r#"{"eventTime": 1, "eventType": "view", "userId": 7}"#,
        r#"{"eventTime": 2, "eventType": "cart", "userId": 8}"#,
        r#"{"eventTime": 3, "eventType": "view"}"#,
        "not json",
        r#"{"eventTime": "yesterday", "eventType": "view", "userId": 7}"#,
        r#"{"eventTime": 4, "eventType": "view", "userId": "seven"}"#,
        // Microseconds, not milliseconds: decades ahead of the clock.
        r#"{"eventTime": 1700000000000000, "eventType": "view", "userId": 7}"#,
    ]
    .join("\n");
    let r = http.post(format!("{url}/v1/events?source=clickstream")).body(body).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["accepted"], 2);
    let rejected = v["rejected"].as_array().unwrap();
    let lines: Vec<i64> = rejected.iter().map(|x| x["line"].as_i64().unwrap()).collect();
    assert_eq!(lines, vec![3, 4, 5, 6, 7]);
    assert!(rejected[0]["reason"].as_str().unwrap().contains("missing required field `userId`"));
    assert!(rejected[1]["reason"].as_str().unwrap().contains("not JSON"));
    assert!(rejected[2]["reason"].as_str().unwrap().contains("time field `eventTime`"));
    assert!(rejected[3]["reason"].as_str().unwrap().contains("`userid` must be integer"));
    let ahead = rejected[4]["reason"].as_str().unwrap();
    assert!(ahead.contains("time field `eventTime` is 1700000000000000") && ahead.contains("ahead of ingest's clock") && ahead.contains("max_ahead_ms = 86400000"), "{ahead}");

    // A JSON array, all good: 202.
    let r = http
        .post(format!("{url}/v1/events?source=clickstream"))
        .body(r#"[{"eventTime": 5, "eventType": "purchase", "userId": 7}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // An unknown source is refused as a whole.
    let r = http.post(format!("{url}/v1/events?source=nope")).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 400);

    // Raw topic: the good record is forwarded, the bad one dead-lettered with the reason.
    bus.send(&raw, None, None, br#"{"eventTime": 6, "eventType": "view", "userId": 9}"#, &[]).await.unwrap();
    bus.send(&raw, None, None, br#"{"eventType": "view", "userId": 9}"#, &[]).await.unwrap();

    let mut events = bus.subscribe(&format!("reader-{tag}"), &[cfg.events_topic.as_str()]).unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(20), events.recv()).await.expect("events").unwrap();
        let partitions = bus.partitions(&cfg.events_topic).await.unwrap();
        if m.header(FRAME_HEADER).is_some() {
            // Posted events: a frame per partition, each event with its partition key and time,
            // the frame with its post's newest event time (the first post's is 2 s, whichever
            // partition that event went to; the second post's 5).
            let frontier: std::collections::BTreeMap<String, i64> = serde_json::from_slice(m.header(frame::FRONTIER_HEADER).expect("a frontier")).unwrap();
            let times: Vec<i64> = frame::entries(&m.payload).map(|e| e.unwrap().time).collect();
            let post_newest = if times.contains(&5) { 5 } else { 2 };
            assert_eq!(frontier, [("clickstream".to_string(), post_newest)].into(), "frame of {times:?}");
            for e in frame::entries(&m.payload) {
                let e = e.expect("a readable frame");
                assert_eq!(e.source, "clickstream");
                let v: Value = serde_json::from_slice(e.payload).unwrap();
                assert_eq!(String::from_utf8(e.key.to_vec()).unwrap(), v["userId"].to_string());
                assert_eq!(partition_for(e.key, partitions), m.partition);
                assert_eq!(e.time, v["eventTime"].as_i64().unwrap());
                got.push(e.time);
            }
        } else {
            // A forwarded raw record: one event.
            assert_eq!(m.header("cepheid-source"), Some(&b"clickstream"[..]));
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(m.key.as_deref().map(|k| String::from_utf8(k.to_vec()).unwrap()), Some(v["userId"].to_string()));
            // Where it was read: the raw topic's first record.
            assert_eq!(m.header(frame::RAW_ORIGIN_HEADER), Some(format!("{raw}/0/0").as_bytes()));
            got.push(v["eventTime"].as_i64().unwrap());
        }
    }
    got.sort();
    assert_eq!(got, vec![1, 2, 5, 6]);
    let mut dead = bus.subscribe(&format!("dead-reader-{tag}"), &[cfg.dead_letter_topic.as_str()]).unwrap();
    let d = tokio::time::timeout(std::time::Duration::from_secs(20), dead.recv()).await.expect("dead letter").unwrap();
    assert!(String::from_utf8_lossy(d.header("cepheid-reason").unwrap()).contains("missing time field `eventTime`"));

    server.stop().await;
}

#[tokio::test]
async fn on_the_memory_bus() {
    scenario(Bus::memory(), "mem").await;
}

#[tokio::test]
async fn on_kafka() {
    let Ok(bootstrap) = std::env::var("CEPHEID_KAFKA_BOOTSTRAP") else {
        eprintln!("on_kafka: CEPHEID_KAFKA_BOOTSTRAP is not set; run through .ci/run (which starts a broker) to include Kafka");
        return;
    };
    let bus = Bus::kafka(&cepheid_bus::KafkaConfig { bootstrap, properties: vec![] }).unwrap();
    scenario(bus, &format!("kafka-{}", std::process::id())).await;
}

/// The broker refuses the first forwards of raw records (librdkafka's mock
/// cluster answers produce requests with a non-retriable error: a fault the
/// real broker here cannot be made to have): ingest sends each refused record
/// again and commits nothing past it meanwhile, so every raw record reaches
/// the events topic — none is lost behind a later record's commit.
#[tokio::test]
async fn refused_forwards_are_sent_again() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let mock = MockCluster::new(1).unwrap();
    let tag = "refused";
    let cfg = config(tag);
    let raw = format!("click_stream1-{tag}");
    // The mock broker cannot create topics through the admin API: provisioned beforehand.
    mock.create_topic(&raw, 1, 1).unwrap();
    mock.create_topic(&cfg.events_topic, 2, 1).unwrap();
    mock.create_topic(&cfg.dead_letter_topic, 1, 1).unwrap();
    let bus = Bus::kafka(&cepheid_bus::KafkaConfig { bootstrap: mock.bootstrap_servers(), properties: vec![] }).unwrap();
    let n = 30;
    for i in 0..n {
        let line = format!(r#"{{"eventTime": {i}, "eventType": "view", "userId": {}}}"#, i % 7);
        bus.send(&raw, None, None, line.as_bytes(), &[]).await.unwrap();
    }
    // Every record is in the raw topic; the next produce requests (ingest's) are refused.
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD; 3]);
    let server = common::start(cfg.clone(), bus.clone(), PostLedger::disabled()).await;
    let url = server.url.clone();
    let mut events = bus.subscribe(&format!("reader-{tag}"), &[cfg.events_topic.as_str()]).unwrap();
    let mut got = Vec::new();
    let mut sent_again = 0;
    while got.len() < n {
        let m = tokio::time::timeout(std::time::Duration::from_secs(60), events.recv()).await.expect("every raw record forwarded").unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        let t = v["eventTime"].as_i64().unwrap();
        // The first send of raw record i (offset i) names it; a send again names
        // nothing (records after it may have been written first).
        match m.header(frame::RAW_ORIGIN_HEADER) {
            Some(o) => assert_eq!(o, format!("{raw}/0/{t}").as_bytes()),
            None => sent_again += 1,
        }
        got.push(t);
    }
    assert!(sent_again >= 1, "no record was sent again without its origin");
    got.sort();
    got.dedup();
    assert_eq!(got, (0..n as i64).collect::<Vec<_>>(), "a raw record is missing from the events topic");
    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    let retries: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cepheid_ingest_raw_retries_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the retries metric");
    assert!(retries >= 1.0, "no forward was refused: the test did not exercise the retry ({metrics})");
    server.stop().await;
    drop(mock);
}
