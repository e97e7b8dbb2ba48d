//! The notifier service in-process: match records on the bus (in-memory here;
//! the same code runs on Kafka), the rule's action from the real Redis rule
//! store, deliveries to a local webhook receiver and a file; duplicates
//! dropped, offsets committed so a restart resumes after what was delivered.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::routing::post;
use cepheid_bus::Bus;
use cepheid_notifier::{run, Deps, Report, ServiceConfig};
use cepheid_notify::config::TargetConfig;
use cepheid_notify::stores::Store;
use cepheid_notify::{NotifierConfig, TokioSleeper};
use cepheid_rules::parse_rule_json;
use cepheid_state::rules::RedisRuleStore;
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};

#[derive(Default)]
struct Rx {
    got: Mutex<Vec<Value>>,
    arrived: Notify,
}

async fn receive(State(rx): State<Arc<Rx>>, body: String) -> &'static str {
    rx.got.lock().unwrap().push(serde_json::from_str(&body).unwrap());
    rx.arrived.notify_waiters();
    "ok"
}

fn record(match_id: &str, order: &str) -> Vec<u8> {
    json!({"rule_id": "order_unpaid", "rule_version": 1, "kind": "match", "key": {"orderId": order},
           "match_id": match_id, "first_event_time": 1, "last_event_time": 1, "detected_at": 2,
           "stages": {"created": [{"orderId": order, "amount": 10}], "paid": []}})
    .to_string()
    .into_bytes()
}

/// A local webhook receiver: what it got, and its address.
async fn webhook_receiver() -> (Arc<Rx>, std::net::SocketAddr) {
    let rx = Arc::new(Rx::default());
    let app = axum::Router::new().route("/hook", post(receive)).with_state(rx.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (rx, addr)
}

/// The `crm` webhook target: the local receiver.
fn crm(addr: std::net::SocketAddr) -> TargetConfig {
    TargetConfig::Webhook { url: format!("http://{addr}/hook"), secret: None, headers: Default::default(), timeout_ms: 5_000, per_second: None }
}

/// The order-unpaid rule with the given targets, in the rule store under `prefix`.
async fn store_rule(prefix: &str, targets: &str) -> RedisRuleStore {
    let rules = RedisRuleStore::connect("redis://127.0.0.1:6379", prefix).await.unwrap();
    let text = r#"{"id":"order_unpaid","version":1,"key_by":"orderId",
        "pattern":[{"name":"created","where":"eventType = 'order_created'"},{"name":"paid","where":"eventType = 'order_paid'","negate":true}],
        "within":"15m","action":{"targets":TARGETS}}"#
        .replace("TARGETS", targets);
    rules.apply(&parse_rule_json(&text).unwrap()).await.unwrap();
    rules
}

async fn until_received(rx: &Rx, n: usize) {
    loop {
        let arrived = rx.arrived.notified();
        if rx.got.lock().unwrap().len() >= n {
            return;
        }
        tokio::time::timeout(std::time::Duration::from_secs(20), arrived).await.expect("webhook deliveries");
    }
}

#[tokio::test]
async fn on_the_memory_bus() {
    delivers_each_match_once_and_resumes_after_commits(Bus::memory(), "mem").await;
}

#[tokio::test]
async fn on_kafka() {
    let Ok(bootstrap) = std::env::var("CEPHEID_KAFKA_BOOTSTRAP") else {
        eprintln!("on_kafka: CEPHEID_KAFKA_BOOTSTRAP is not set; run through .ci/run (which starts a broker) to include Kafka");
        return;
    };
    let bus = Bus::kafka(&cepheid_bus::KafkaConfig { bootstrap, properties: vec![] }).unwrap();
    delivers_each_match_once_and_resumes_after_commits(bus, "kafka").await;
}

async fn delivers_each_match_once_and_resumes_after_commits(bus: Bus, tag: &str) {
    let (rx, addr) = webhook_receiver().await;

    let prefix = format!("cepheid-test:notifier-svc-{tag}:{}", std::process::id());
    let topic = format!("cepheid-test-matches-{tag}-{}", std::process::id());
    let rules = store_rule(&prefix, r#"["webhook:crm","file:ops"],"template":"order {{ key.orderId }} unpaid""#).await;
    let dir = std::env::temp_dir().join(format!("cepheid-notifier-svc-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ops.jsonl");
    let _ = std::fs::remove_file(&file);
    let mut ncfg = NotifierConfig::default();
    ncfg.targets.insert("crm".into(), crm(addr));
    ncfg.targets.insert("ops".into(), TargetConfig::File { path: file.clone() });
    let scfg = ServiceConfig { matches_topic: topic.clone(), group: format!("{topic}-g"), matches_partitions: 2, delay_poll_ms: 50, ..Default::default() };

    let store = Store::redis("redis://127.0.0.1:6379", &prefix).await.unwrap();
    let metrics_listener = std::sync::Mutex::new(Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()));
    let metrics_addr = metrics_listener.lock().unwrap().as_ref().unwrap().local_addr().unwrap();
    let start = |bus: Bus, store: Store| {
        let (tx, stop) = oneshot::channel::<()>();
        let http = metrics_listener.lock().unwrap().take();
        let deps = Deps {
            bus,
            rules: rules.clone(),
            store,
            clock: Arc::new(cepheid_types::SystemClock),
            sleeper: Arc::new(TokioSleeper),
            http,
            telemetry: Arc::default(),
        };
        let h = tokio::spawn(run(scfg.clone(), ncfg.clone(), deps, async move {
            let _ = stop.await;
        }));
        (tx, h)
    };

    let (stop, handle) = start(bus.clone(), store.clone());
    // The service creates the topic; wait for it by sending until it exists.
    loop {
        if bus.partitions(&topic).await.is_ok() {
            break;
        }
        tokio::task::yield_now().await;
    }
    // One partition, so records are consumed in order; m3 comes last, so its
    // delivery means every record before it was processed.
    for (id, order) in [("m1", "o1"), ("m2", "o2"), ("m1", "o1")] {
        bus.send(&topic, Some(0), Some(order.as_bytes()), &record(id, order), &[]).await.unwrap(); // m1 twice: redelivered
    }
    bus.send(&topic, Some(0), None, b"not a record", &[]).await.unwrap();
    bus.send(&topic, Some(0), Some(b"o3"), &record("m3", "o3"), &[]).await.unwrap();
    until_received(&rx, 3).await;
    let metrics = reqwest::get(format!("http://{}/metrics", metrics_addr)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("cepheid_notifier_sent_total{target=\"crm\"} 3"), "{metrics}");
    assert!(metrics.contains("cepheid_notifier_deduplicated_total{target=\"crm\"} 1"), "{metrics}");
    assert_eq!(reqwest::get(format!("http://{}/readyz", metrics_addr)).await.unwrap().status(), 200);
    stop.send(()).unwrap();
    let report: Report = handle.await.unwrap().unwrap();
    assert_eq!((report.records, report.submitted, report.skipped), (5, 4, 1));
    let got = rx.got.lock().unwrap().clone();
    let mut ids: Vec<String> = got.iter().map(|v| v["match"]["match_id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    assert_eq!(ids, vec!["m1", "m2", "m3"], "one delivery per match");
    let m1 = got.iter().find(|v| v["match"]["match_id"] == "m1").unwrap();
    assert_eq!(m1["message"], "order o1 unpaid");
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 3);

    // A restart resumes after the committed records: only the new one is delivered.
    bus.send(&topic, Some(0), Some(b"o4"), &record("m4", "o4"), &[]).await.unwrap();
    let (stop, handle) = start(bus.clone(), store.clone());
    until_received(&rx, 4).await;
    stop.send(()).unwrap();
    let report = handle.await.unwrap().unwrap();
    assert_eq!(report.records, 1);
    assert_eq!(rx.got.lock().unwrap().len(), 4);

    cepheid_state::delete_prefix("redis://127.0.0.1:6379", &prefix).await.unwrap();
}

/// A rule naming a target this notifier does not have used to stop the
/// service with an error, and a restart stopped again on the same record: the
/// matches partition was stuck. Now the alert goes to the rule's other
/// targets, the dead-letter file keeps it for the missing one (with the rule
/// and the target named), and the records after it are delivered.
#[tokio::test]
async fn a_target_the_notifier_lacks_is_dead_lettered_and_the_rest_delivered() {
    let (rx, addr) = webhook_receiver().await;

    let prefix = format!("cepheid-test:notifier-svc-missing:{}", std::process::id());
    let topic = format!("cepheid-test-matches-missing-{}", std::process::id());
    let rules = store_rule(&prefix, r#"["webhook:crm","webhook:risk_desk"]"#).await;
    let dir = std::env::temp_dir().join(format!("cepheid-notifier-svc-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dead = dir.join("dead.jsonl");
    let _ = std::fs::remove_file(&dead);
    let mut ncfg = NotifierConfig::default();
    ncfg.targets.insert("crm".into(), crm(addr));
    ncfg.dead_letter = Some(dead.clone());
    let scfg = ServiceConfig { matches_topic: topic.clone(), group: format!("{topic}-g"), matches_partitions: 1, delay_poll_ms: 50, ..Default::default() };
    let bus = Bus::memory();
    let deps = Deps {
        bus: bus.clone(),
        rules: rules.clone(),
        store: Store::redis("redis://127.0.0.1:6379", &prefix).await.unwrap(),
        clock: Arc::new(cepheid_types::SystemClock),
        sleeper: Arc::new(TokioSleeper),
        http: None,
        telemetry: Arc::default(),
    };
    let (stop, rx_stop) = oneshot::channel::<()>();
    let handle = tokio::spawn(run(scfg, ncfg, deps, async move {
        let _ = rx_stop.await;
    }));
    while bus.partitions(&topic).await.is_err() {
        tokio::task::yield_now().await;
    }
    bus.send(&topic, Some(0), Some(b"o1"), &record("m1", "o1"), &[]).await.unwrap();
    bus.send(&topic, Some(0), Some(b"o2"), &record("m2", "o2"), &[]).await.unwrap();
    until_received(&rx, 2).await;
    stop.send(()).unwrap();
    let report = handle.await.unwrap().expect("the notifier keeps running");
    assert_eq!((report.records, report.submitted), (2, 2));
    let lines: Vec<Value> = std::fs::read_to_string(&dead).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, id) in lines.iter().zip(["m1", "m2"]) {
        assert_eq!(line["target"], "webhook:risk_desk");
        assert_eq!(line["match"]["match_id"], id);
        assert_eq!(line["retryable"], false);
        let error = line["error"].as_str().unwrap();
        assert!(error.contains("order_unpaid") && error.contains("webhook:risk_desk"), "{error}");
    }
    cepheid_state::delete_prefix("redis://127.0.0.1:6379", &prefix).await.unwrap();
}
