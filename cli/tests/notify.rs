//! `cepheid run --notify`: the embedded pipeline composes the notifier, so
//! a rule's action delivers rendered alerts to its targets.

use std::sync::Arc;

use cepheid_cli::run::{NotifyStage, Pipeline};
use cepheid_cli::settings::Settings;
use cepheid_engine::engine::ManualClock;
use cepheid_notify::config::TargetConfig;

#[test]
fn alerts_reach_a_file_target() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("unpaid.json"),
        r#"{"id":"order_unpaid","version":1,"key_by":"orderId","pattern":[
            {"name":"created","where":"eventType = 'order_created'"},
            {"name":"paid","where":"eventType = 'order_paid'","negate":true}],
          "within":"15m",
          "action":{"targets":["file:ops","webhook:missing"],"template":"order {{ key.orderId }} not paid ({{ created[0].amount }} yuan)"}}"#,
    )
    .unwrap();
    let mut settings = Settings::load(None).unwrap();
    let delivered = tmp.path().join("delivered.jsonl");
    settings.notifier.targets.insert("ops".into(), TargetConfig::File { path: delivered.clone() });
    // `webhook:missing` is not configured: its alerts go to the dead letter, the file still gets them.
    let dead = tmp.path().join("dead.jsonl");
    settings.notifier.dead_letter = Some(dead.clone());
    let mut p = Pipeline::new(
        &settings,
        "orders",
        &rules,
        Arc::new(ManualClock::new(0)),
        Box::new(std::io::sink()),
        tmp.path().join("late.jsonl"),
        tmp.path().join("rejected.jsonl"),
        Box::new(std::io::sink()),
    )
    .unwrap();
    p.notify = Some(NotifyStage::start(settings.notifier.clone(), settings.kafka.as_ref()).unwrap());
    p.line("t", 1, r#"{"eventTime":0,"orderId":"o1","eventType":"order_created","amount":99}"#).unwrap();
    p.line("t", 2, r#"{"eventTime":1000,"orderId":"o2","eventType":"order_created","amount":5}"#).unwrap();
    p.line("t", 3, r#"{"eventTime":60000,"orderId":"o2","eventType":"order_paid"}"#).unwrap();
    p.finish().unwrap();
    let text = std::fs::read_to_string(delivered).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["message"], "order o1 not paid (99 yuan)");
    assert_eq!(lines[0]["match"]["rule_id"], "order_unpaid");
    let dead: Vec<serde_json::Value> = std::fs::read_to_string(dead).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["target"], "webhook:missing");
    assert_eq!(dead[0]["match"]["match_id"], lines[0]["match"]["match_id"]);
}

#[test]
fn a_kafka_target_without_kafka_is_refused() {
    let mut settings = Settings::load(None).unwrap();
    settings.notifier.targets.insert("alerts".into(), TargetConfig::Kafka { topic: "alerts".into(), partitions: 1 });
    let err = NotifyStage::start(settings.notifier.clone(), None).err().expect("refused");
    assert!(err.to_string().contains("no [kafka] bootstrap"), "{err}");
}
