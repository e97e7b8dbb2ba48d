//! A matcher shard alone, reading frames of events written by hand: the events
//! of a frame are matched, the watermarks it carries apply after them, and an
//! event it cannot use (late at the shard, or a damaged rest of a frame) goes
//! to the dead-letter topic naming the frame entry it came from. A frame's
//! watermark releases at once when no other record is waiting.

use std::sync::Arc;
use std::time::Duration;

use cepheid_bus::frame::{Entry, FrameWriter, FRAME_HEADER, FRAME_VERSION};
use cepheid_bus::Bus;
use cepheid_engine::engine::EngineConfig;
use cepheid_matcher_shard::ShardConfig;
use cepheid_state::rules::RedisRuleStore;
use cepheid_types::MatchRecord;

const REDIS: &str = "redis://127.0.0.1:6379";

fn event(t: i64, user: i64) -> String {
    format!(r#"{{"eventTime":{t},"kind":"buy","userId":{user}}}"#)
}

async fn recv(c: &mut cepheid_bus::Consumer, what: &str) -> cepheid_bus::Message {
    tokio::time::timeout(Duration::from_secs(20), c.recv()).await.unwrap_or_else(|_| panic!("no {what}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_matched_and_their_bad_entries_dead_lettered() {
    let tag = format!("frames-{}", std::process::id());
    let prefix = format!("cepheid-test:{tag}");
    let store = RedisRuleStore::connect(REDIS, &prefix).await.unwrap();
    let rule = cepheid_rules::parse_rule_json(r#"{"id":"buys","version":1,"key_by":"userId","pattern":[{"name":"a","where":"kind = 'buy'"}]}"#).unwrap();
    store.apply(&rule).await.unwrap();
    let bus = Bus::memory();
    let cfg = ShardConfig {
        keyed_topic: format!("keyed-{tag}"),
        keyed_partitions: 1,
        matches_topic: format!("matches-{tag}"),
        matches_partitions: 1,
        dead_letter_topic: format!("dead-{tag}"),
        group: format!("shard-{tag}"),
        // Never by the interval: a frame's watermark releases as soon as no record is waiting.
        release_interval_ms: 3_600_000,
        ..Default::default()
    };
    let deps = cepheid_matcher_shard::Deps {
        bus: bus.clone(),
        rules: store.clone(),
        redis_url: REDIS.into(),
        prefix: prefix.clone(),
        clock: Arc::new(cepheid_types::SystemClock),
        telemetry: Default::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shard = tokio::spawn(cepheid_matcher_shard::run(cfg.clone(), EngineConfig::default(), deps, None, async move {
        let _ = stopped.await;
    }));
    let mut matches = loop {
        if let Ok(c) = bus.subscribe("reader", &[cfg.matches_topic.as_str()]) {
            break c;
        }
        tokio::task::yield_now().await;
    };
    bus.create_topic(&cfg.keyed_topic, 1).await.unwrap();
    bus.create_topic(&cfg.dead_letter_topic, 1).await.unwrap();
    let send_frame = |entries: Vec<(&'static str, i64, String)>, watermark: Option<i64>, cut: usize| {
        let (bus, topic) = (bus.clone(), cfg.keyed_topic.clone());
        async move {
            let mut w = FrameWriter::default();
            for (key, t, payload) in &entries {
                w.push(&Entry { key: key.as_bytes(), time: *t, source: "clickstream", trace: None, payload: payload.as_bytes() });
            }
            let mut payload = w.take();
            payload.truncate(payload.len() - cut);
            let marks = watermark.map(|w| format!(r#"{{"clickstream":{w}}}"#)).unwrap_or_default();
            let mut headers = vec![(FRAME_HEADER, FRAME_VERSION)];
            if watermark.is_some() {
                headers.extend([("cepheid-watermarks", marks.as_bytes()), ("cepheid-router", &b"r1"[..])]);
            }
            bus.send(&topic, Some(0), None, &payload, &headers).await.unwrap();
        }
    };

    // Two keys' events, then the router's watermark past both: two matches.
    send_frame(vec![("userId|1", 1_000, event(1_000, 1)), ("userId|2", 1_500, event(1_500, 2))], Some(5_000), 0).await;
    let mut keys = Vec::new();
    for _ in 0..2 {
        let m = recv(&mut matches, "match").await;
        let r = MatchRecord::from_json_line(std::str::from_utf8(&m.payload).unwrap()).unwrap();
        assert_eq!(r.rule_id, "buys");
        keys.push(r.key["userId"].to_string());
    }
    keys.sort();
    assert_eq!(keys, vec!["1", "2"]);

    // An event behind the partition's watermark, a good one, and a frame cut short in its third entry.
    send_frame(vec![("userId|3", 4_000, event(4_000, 3)), ("userId|4", 6_000, event(6_000, 4)), ("userId|5", 7_000, event(7_000, 5))], Some(9_000), 3).await;
    let m = recv(&mut matches, "match").await;
    let r = MatchRecord::from_json_line(std::str::from_utf8(&m.payload).unwrap()).unwrap();
    assert_eq!(r.key["userId"], 4, "only the good event of the second frame matches");
    let mut dead = bus.subscribe("dead-reader", &[cfg.dead_letter_topic.as_str()]).unwrap();
    let late = recv(&mut dead, "dead letter").await;
    let header = |m: &cepheid_bus::Message, h: &str| String::from_utf8_lossy(m.header(h).unwrap()).into_owned();
    assert!(header(&late, "cepheid-reason").contains("late at the shard: event time 4000 is behind the partition's watermark 5000"), "{}", header(&late, "cepheid-reason"));
    assert_eq!(header(&late, "cepheid-origin"), format!("{}/0/1#0", cfg.keyed_topic));
    assert_eq!(late.payload, event(4_000, 3).as_bytes());
    let cut = recv(&mut dead, "dead letter").await;
    assert!(header(&cut, "cepheid-reason").contains("unreadable frame: entry 2: cut short"), "{}", header(&cut, "cepheid-reason"));
    assert_eq!(header(&cut, "cepheid-origin"), format!("{}/0/1#2", cfg.keyed_topic));
    let rest = String::from_utf8_lossy(&cut.payload);
    assert!(rest.contains("userId|5") && !rest.contains("userId|4"), "the damaged rest of the frame, not the good entries before it: {rest}");

    stop.send(()).unwrap();
    let report = shard.await.unwrap().unwrap();
    assert_eq!((report.records, report.events, report.late, report.rejected, report.matches), (2, 4, 1, 1, 3), "{report:?}");
    store.delete("buys").await.unwrap();
    cepheid_state::delete_prefix(REDIS, &prefix).await.unwrap();
}
