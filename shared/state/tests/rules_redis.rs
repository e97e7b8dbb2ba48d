//! The rule store against the real Redis on 127.0.0.1:6379 (started on every
//! machine before tests run). Each test uses its own key prefix and removes
//! its keys afterwards.

use std::time::Duration;

use cepheid_rules::parse_rule_json;
use cepheid_state::rules::{ChangeOp, RedisRuleStore};
use cepheid_state::StateError;
use futures_util::StreamExt;

const URL: &str = "redis://127.0.0.1:6379";

fn prefix(name: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("cepheid-test:{name}:{}:{nanos}", std::process::id())
}

async fn cleanup(prefix: &str) {
    cepheid_state::delete_prefix(URL, prefix).await.unwrap();
}

/// The test that pauses Redis's writers runs alone (its pause would hold the
/// others' commands back past their connections' timeouts).
static PAUSES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A slow Redis (every client's writes paused 1.2 s) delays a rule change;
/// it does not fail it (with the `redis` crate's 500 ms the change was
/// reported as failed, and carried out once the pause ended).
#[tokio::test]
async fn a_slow_redis_delays_a_rule_change_without_failing_it() {
    let _alone = PAUSES.write().await;
    let p = prefix("slow");
    let store = RedisRuleStore::connect(URL, &p).await.unwrap();
    let client = redis::Client::open(URL).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(1_200).arg("WRITE").query_async(&mut c).await.unwrap();
    let started = std::time::Instant::now();
    let applied = store.apply(&rule(1, "x = 1")).await;
    let took = started.elapsed();
    let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query_async(&mut c).await.unwrap();
    applied.unwrap();
    assert!(took >= Duration::from_millis(1_000), "the pause held the change back ({took:?})");
    assert_eq!(store.get("r1").await.unwrap().map(|r| r.version), Some(1));
    cleanup(&p).await;
}

fn rule(version: u64, cond: &str) -> cepheid_rules::RuleSpec {
    parse_rule_json(&format!(r#"{{"id":"r1","version":{version},"pattern":[{{"name":"a","where":"{cond}"}}]}}"#)).unwrap()
}

#[tokio::test]
async fn versions_history_disable_delete() {
    let _shared = PAUSES.read().await;
    let p = prefix("crud");
    let store = RedisRuleStore::connect(URL, &p).await.unwrap();
    store.apply(&rule(1, "x = 1")).await.unwrap();
    store.apply(&rule(2, "x = 2")).await.unwrap();
    // Equal and older versions are refused, and nothing changes.
    for v in [2, 1] {
        match store.apply(&rule(v, "x = 9")).await {
            Err(StateError::Refused(m)) => assert!(m.contains("not newer than the stored version 2"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    let got = store.get("r1").await.unwrap().unwrap();
    assert_eq!(got.version, 2);
    assert_eq!(got.pattern[0].kind, parse_rule_json(r#"{"id":"r1","version":2,"pattern":[{"name":"a","where":"x = 2"}]}"#).unwrap().pattern[0].kind);
    assert_eq!(store.history("r1").await.unwrap(), vec![1, 2]);

    let disabled = store.disable("r1").await.unwrap();
    assert_eq!((disabled.version, disabled.enabled), (3, false));
    let (all, _) = store.list().await.unwrap();
    assert_eq!(all.len(), 1);
    assert!(!all[0].enabled);

    store.delete("r1").await.unwrap();
    assert!(store.get("r1").await.unwrap().is_none());
    assert!(matches!(store.delete("r1").await, Err(StateError::NotFound(_))));
    // The version number stays taken: re-creating needs a higher one.
    assert!(store.apply(&rule(3, "x = 1")).await.is_err());
    store.apply(&rule(4, "x = 1")).await.unwrap();
    assert_eq!(store.list().await.unwrap().0.len(), 1);
    cleanup(&p).await;
}

#[tokio::test]
async fn changes_are_published() {
    let _shared = PAUSES.read().await;
    let p = prefix("feed");
    let store = RedisRuleStore::connect(URL, &p).await.unwrap();
    let mut feed = Box::pin(store.subscribe().await.unwrap());
    store.apply(&rule(1, "x = 1")).await.unwrap();
    store.delete("r1").await.unwrap();
    let a = tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap().unwrap();
    assert_eq!((a.op, a.id.as_str(), a.version), (ChangeOp::Upsert, "r1", 1));
    let b = tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap().unwrap();
    assert_eq!((b.op, b.version), (ChangeOp::Delete, 1));
    assert!(b.seq > a.seq);
    let (_, seq) = store.list().await.unwrap();
    assert_eq!(seq, b.seq);
    cleanup(&p).await;
}
