//! The keygen-router: routes by filter and key, never by start conditions;
//! follows rule changes live; propagates watermarks to every partition.

use std::time::Duration;

use cepheid_bus::frame::{self, FRAME_HEADER};
use cepheid_bus::{partition_for, Bus};
use cepheid_engine::engine::EngineConfig;
use cepheid_keygen_router::{run, Route, Routed, Router, RouterConfig};
use cepheid_rules::parse_rule_json;
use cepheid_state::rules::RedisRuleStore;

fn rule(id: &str, version: u64, body: &str) -> cepheid_rules::RuleSpec {
    parse_rule_json(&format!(r#"{{"id":"{id}","version":{version},{body}}}"#)).unwrap()
}

#[test]
fn routes_by_filter_and_key() {
    let mut r = Router::new(EngineConfig::default());
    r.upsert(&rule("by_user", 1, r#""filter":"eventType IN ('view','cart')","key_by":"userId","pattern":[{"name":"a","where":"eventType = 'cart'"}]"#)).unwrap();
    r.upsert(&rule("by_user_product", 1, r#""key_by":["userId","productId"],"pattern":[{"name":"a","where":"price > 100"}]"#)).unwrap();
    r.upsert(&rule("orders_only", 1, r#""source":"orders","key_by":"orderId","pattern":[{"name":"a"}]"#)).unwrap();
    r.upsert(&rule("off", 1, r#""enabled":false,"key_by":"x","pattern":[{"name":"a"}]"#)).unwrap();
    assert_eq!(r.rule_count(), 3);
    // A view goes to both clickstream rules although neither's first stage
    // takes it: shards with live state for the key need it.
    let routed = r.route("clickstream", r#"{"eventTime":5000,"eventType":"view","userId":7,"productId":3,"price":1}"#).unwrap();
    assert_eq!(
        routed,
        Routed::Routes {
            time: 5000,
            routes: vec![Route { signature: "userId".into(), key: "7".into() }, Route { signature: "userId,productId".into(), key: "7|3".into() }]
        }
    );
    // Filtered out of by_user; missing productId for the other.
    assert_eq!(r.route("clickstream", r#"{"eventTime":6000,"eventType":"purchase","userId":7}"#).unwrap(), Routed::Routes { time: 6000, routes: vec![] });
    assert!(r.route("clickstream", r#"{"eventType":"view"}"#).is_err());
    // Watermark: newest time − 2 s default bound; older events are late (equal is not).
    assert_eq!(r.watermarks(0), vec![("clickstream".to_string(), 4000)]);
    assert_eq!(r.route("clickstream", r#"{"eventTime":3999,"eventType":"view","userId":7}"#).unwrap(), Routed::Late { time: 3999, watermark: 4000 });
    assert!(matches!(r.route("clickstream", r#"{"eventTime":4000,"eventType":"view","userId":7}"#).unwrap(), Routed::Routes { .. }));
    r.remove("by_user");
    let Routed::Routes { routes, .. } = r.route("clickstream", r#"{"eventTime":7000,"eventType":"view","userId":7,"productId":3}"#).unwrap() else { panic!() };
    assert_eq!(routes.len(), 1);
}

#[test]
fn many_equality_rules_route_through_the_index() {
    let mut r = Router::new(EngineConfig::default());
    for i in 0..20_000 {
        r.upsert(&rule(&format!("p{i}"), 1, &format!(r#""filter":"productId = {i}","key_by":"userId","pattern":[{{"name":"a"}}]"#))).unwrap();
    }
    let routed = r.route("s", r#"{"eventTime":1,"productId":12345,"userId":1}"#).unwrap();
    assert_eq!(routed, Routed::Routes { time: 1, routes: vec![Route { signature: "userId".into(), key: "1".into() }] });
    let routed = r.route("s", r#"{"eventTime":1,"productId":99999,"userId":1}"#).unwrap();
    assert_eq!(routed, Routed::Routes { time: 1, routes: vec![] });
}

#[tokio::test]
async fn service_follows_rule_changes_and_sends_watermarks() {
    let prefix = format!("cepheid-test:router:{}", std::process::id());
    let store = RedisRuleStore::connect("redis://127.0.0.1:6379", &prefix).await.unwrap();
    store.apply(&rule("a", 1, r#""key_by":"userId","pattern":[{"name":"x","where":"kind = 'a'"}]"#)).await.unwrap();
    let bus = Bus::memory();
    // Watermarks are checked with a second router below; here they stay out of the way.
    let cfg = RouterConfig { keyed_partitions: 3, watermark_interval_ms: 3_600_000, ..Default::default() };
    bus.create_topic(&cfg.events_topic, 1).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probe_addr = probe.local_addr().unwrap();
    let handle = tokio::spawn(run(cfg.clone(), EngineConfig::default(), bus.clone(), store.clone(), Default::default(), Some(probe), async move {
        let _ = stopped.await;
    }));
    let mut keyed = loop {
        if let Ok(c) = bus.subscribe("reader", &[cfg.keyed_topic.as_str()]) {
            break c;
        }
        tokio::task::yield_now().await;
    };
    let send = |t: i64, user: i64, product: i64| {
        let bus = bus.clone();
        let topic = cfg.events_topic.clone();
        async move {
            let e = format!(r#"{{"eventTime":{t},"kind":"a","userId":{user},"productId":{product}}}"#);
            bus.send(&topic, Some(0), None, e.as_bytes(), &[("cepheid-source", b"clickstream")]).await.unwrap();
        }
    };
    let mut watermark_partitions = std::collections::BTreeSet::new();
    send(1_000, 7, 1).await;
    let got = take(&mut keyed, &mut watermark_partitions, 1).await;
    assert_eq!(got, vec![("userId|7".to_string(), partition_for(b"userId|7", 3))]);

    // A record ingest forwarded from raw topic click_stream1 (partition 2,
    // offset 77): its entry's origin is the raw record, in the stream of that
    // raw topic via this events partition, named in the frame's list.
    let e = r#"{"eventTime":1500,"kind":"a","userId":7,"productId":1}"#;
    bus.send(&cfg.events_topic, Some(0), None, e.as_bytes(), &[("cepheid-source", b"clickstream"), (frame::RAW_ORIGIN_HEADER, b"click_stream1/2/77")]).await.unwrap();
    let m = loop {
        let m = tokio::time::timeout(Duration::from_secs(20), keyed.recv()).await.expect("a frame").unwrap();
        if m.header(FRAME_HEADER).is_some() {
            break m;
        }
    };
    let streams: Vec<&str> = std::str::from_utf8(m.header(frame::ORIGIN_TOPIC_HEADER).unwrap()).unwrap().split(',').collect();
    assert_eq!(streams, ["cepheid.events", "click_stream1 via cepheid.events/0"], "the streams named so far, in the order first met");
    let entries: Vec<frame::Entry> = frame::entries(&m.payload).collect::<Result<_, _>>().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].origin, Some(frame::Origin { stream: 1, partition: 2, offset: 77, index: 0 }));

    // A rule with another key arrives live.
    store.apply(&rule("b", 1, r#""key_by":["userId","productId"],"pattern":[{"name":"x"}]"#)).await.unwrap();
    // Until the router has applied it, events route to `a` only: keep sending until both keys appear.
    let mut both = false;
    for t in 0..200 {
        send(2_000 + t, 8, 2).await;
        let got = take(&mut keyed, &mut watermark_partitions, 1).await;
        if got.iter().any(|(k, _)| k == "userId,productId|8|2") {
            both = true;
            break;
        }
    }
    assert!(both, "the new rule never took effect");
    let metrics = reqwest::get(format!("http://{probe_addr}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("cepheid_router_rules 2"), "{metrics}");
    assert!(metrics.contains("cepheid_router_routed_total "), "{metrics}");
    assert_eq!(reqwest::get(format!("http://{probe_addr}/readyz")).await.unwrap().status(), 200);
    store.delete("a").await.unwrap();
    stop.send(()).unwrap();
    let report = handle.await.unwrap().unwrap();
    assert!(report.routed >= 2, "{report:?}");

    // A router with a short interval sends each source's watermark to every partition.
    let cfg2 = RouterConfig { watermark_interval_ms: 20, group: "router-2".into(), router_id: Some("router-2".into()), ..cfg.clone() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(run(cfg2, EngineConfig::default(), bus.clone(), store.clone(), Default::default(), None, async move {
        let _ = stopped.await;
    }));
    send(9_000, 9, 9).await;
    // It re-reads the topic from its own group's start; watermarks only grow,
    // up to the newest event time minus the 2 s bound, on every partition.
    let mut seen: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    while seen.len() < 3 || seen.values().any(|w| *w < 9_000 - 2_000) {
        let m = tokio::time::timeout(Duration::from_secs(20), keyed.recv()).await.expect("watermarks").unwrap();
        // (The first router's records, with its own watermarks, are still being read.)
        if m.header("cepheid-router") != Some(&b"router-2"[..]) {
            continue;
        }
        if let Some(w) = m.header("cepheid-watermark") {
            let w: i64 = String::from_utf8_lossy(w).parse().unwrap();
            assert_eq!(m.header("cepheid-source"), Some(&b"clickstream"[..]));
            let prev = seen.insert(m.partition, w);
            assert!(prev.is_none_or(|p| p <= w), "watermark went back on partition {}: {prev:?} -> {w}", m.partition);
            assert!(w <= 9_000 - 2_000);
        }
    }
    stop.send(()).unwrap();
    let report = handle.await.unwrap().unwrap();
    assert!(report.watermarks_sent >= 3, "{report:?}");
    store.delete("b").await.unwrap();

    cepheid_state::delete_prefix("redis://127.0.0.1:6379", &prefix).await.unwrap();
}

/// Reads keyed records (noting watermark records) until `n` events arrived.
async fn take(keyed: &mut cepheid_bus::Consumer, wp: &mut std::collections::BTreeSet<i32>, n: usize) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(20), keyed.recv()).await.expect("keyed records").unwrap();
        if m.header(FRAME_HEADER).is_none() {
            // A watermark record (frames of events carry the router's watermarks too).
            assert!(m.key.is_none() && m.header("cepheid-watermark").is_some(), "a keyed record that is not a frame is a watermark");
            wp.insert(m.partition);
            continue;
        }
        assert!(m.key.is_none(), "a frame's partition is its events' (they have their own keys)");
        let streams = String::from_utf8(m.header(frame::ORIGIN_TOPIC_HEADER).expect("origin streams").to_vec()).unwrap();
        assert_eq!(streams.split(',').next(), Some("cepheid.events"), "a frame names the events topic its entries were read from");
        let entries: Vec<frame::Entry> = frame::entries(&m.payload).collect::<Result<_, _>>().expect("a readable frame");
        assert!(!entries.is_empty());
        if let Some(w) = m.header("cepheid-watermarks") {
            // The router's watermark per source as of sending the frame (its events come before it).
            let marks: std::collections::BTreeMap<String, i64> = serde_json::from_slice(w).unwrap();
            assert!(marks.contains_key("clickstream"), "{marks:?}");
            assert!(m.header("cepheid-router").is_some());
        }
        for e in entries {
            let key = String::from_utf8(e.key.to_vec()).unwrap();
            assert_eq!(partition_for(e.key, 3), m.partition, "{key} framed for the wrong partition");
            assert_eq!(e.source, "clickstream");
            // Where the router read it: plain records of events partition 0, one event each.
            let origin = e.origin.expect("the router's entries carry their origin");
            assert_eq!((origin.stream, origin.partition, origin.index), (0, 0, 0), "{origin:?}");
            out.push((key, m.partition));
        }
    }
    out
}

/// With several input partitions the watermark sent is the minimum over them,
/// and none is sent while an assigned partition has not delivered its first
/// record (its events may be older than the others') unless it has been idle
/// for `idle_partition_ms`; an event behind what was sent is late, whatever
/// its own partition's progress.
#[test]
fn watermark_waits_for_every_assigned_partition_or_its_idleness() {
    let mut r = Router::new(EngineConfig::default());
    r.set_idle_partition_ms(5_000);
    r.upsert(&rule("by_user", 1, r#""key_by":"userId","pattern":[{"name":"a"}]"#)).unwrap();
    r.keep_partitions(&[0, 1, 2], 0);
    r.heard_from(0, 10);
    assert!(r.route_from("clickstream", 0, r#"{"eventTime":50000,"userId":1}"#).is_ok());
    assert_eq!(r.watermarks(100), vec![], "partitions 1 and 2 have not been heard from");
    r.heard_from(1, 200);
    assert!(r.route_from("clickstream", 1, r#"{"eventTime":20000,"userId":2}"#).is_ok());
    assert_eq!(r.watermarks(300), vec![], "partition 2 neither");
    // Partition 2 stays silent past the idleness limit: it no longer holds the watermark back.
    assert_eq!(r.watermarks(5_000), vec![("clickstream".to_string(), 18_000)], "minimum over partitions 0 and 1");
    // Partition 2 wakes up with an event behind what was sent: late.
    r.heard_from(2, 5_100);
    assert_eq!(r.route_from("clickstream", 2, r#"{"eventTime":17000,"userId":3}"#).unwrap(), Routed::Late { time: 17000, watermark: 18000 });
    // Partition 1 goes idle too; the watermark never goes back.
    r.heard_from(0, 9_000);
    assert!(r.route_from("clickstream", 0, r#"{"eventTime":60000,"userId":1}"#).is_ok());
    let w = r.watermarks(9_500);
    assert_eq!(w, vec![("clickstream".to_string(), 18_000)], "partition 2's own progress (17 s) is below what was sent");
}

/// Ingest's frontier (the newest event time of a post) counts as the newest
/// time of the partition its frame came on: a partition whose share of the
/// post stops short of the post's newest event does not hold the watermark
/// back to its own events; what comes after the post is judged by it.
#[test]
fn a_posts_frontier_moves_the_partitions_its_frames_came_on() {
    let mut r = Router::new(EngineConfig::default());
    r.upsert(&rule("by_user", 1, r#""key_by":"userId","pattern":[{"name":"a"}]"#)).unwrap();
    r.keep_partitions(&[0, 1], 0);
    r.heard_from(0, 10);
    r.heard_from(1, 10);
    assert!(r.route_from("clickstream", 0, r#"{"eventTime":50000,"userId":1}"#).is_ok());
    assert!(r.route_from("clickstream", 1, r#"{"eventTime":20000,"userId":2}"#).is_ok());
    assert_eq!(r.watermarks(20), vec![("clickstream".to_string(), 18_000)], "partition 1's own events stop at 20 s");
    // Both frames carried the post's frontier, 50 s.
    r.frontier("clickstream", 0, 50_000);
    r.frontier("clickstream", 1, 50_000);
    assert_eq!(r.watermarks(30), vec![("clickstream".to_string(), 48_000)]);
    assert_eq!(r.route_from("clickstream", 1, r#"{"eventTime":47999,"userId":2}"#).unwrap(), Routed::Late { time: 47999, watermark: 48000 });
    assert!(matches!(r.route_from("clickstream", 1, r#"{"eventTime":48000,"userId":2}"#).unwrap(), Routed::Routes { .. }));
    // A frontier never takes a partition back.
    r.frontier("clickstream", 0, 1_000);
    assert_eq!(r.watermarks(40), vec![("clickstream".to_string(), 48_000)]);
}

/// When the watermark moves, every keyed partition hears of it at once: those
/// that got a frame in it, the others by a watermark record — not at the next
/// `watermark_interval_ms` tick, nor with the next event bound for them.
#[tokio::test]
async fn a_moved_watermark_reaches_every_keyed_partition_at_once() {
    let prefix = format!("cepheid-test:router-frontier:{}", std::process::id());
    let store = RedisRuleStore::connect("redis://127.0.0.1:6379", &prefix).await.unwrap();
    store.apply(&rule("a", 1, r#""key_by":"userId","pattern":[{"name":"x"}]"#)).await.unwrap();
    let bus = Bus::memory();
    let cfg = RouterConfig { keyed_partitions: 3, watermark_interval_ms: 3_600_000, ..Default::default() };
    bus.create_topic(&cfg.events_topic, 1).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(run(cfg.clone(), EngineConfig::default(), bus.clone(), store.clone(), Default::default(), None, async move {
        let _ = stopped.await;
    }));
    let mut keyed = loop {
        if let Ok(c) = bus.subscribe("reader", &[cfg.keyed_topic.as_str()]) {
            break c;
        }
        tokio::task::yield_now().await;
    };
    // A post as ingest writes it: two events of user 7 at 10 s on this
    // partition, the post's newest event (30 s) on another.
    let mut w = frame::FrameWriter::default();
    let payload = br#"{"eventTime":10000,"userId":7}"#;
    w.push(&frame::Entry { key: b"7", time: 10_000, source: "clickstream", trace: None, payload, origin: None });
    w.push(&frame::Entry { key: b"7", time: 10_000, source: "clickstream", trace: None, payload, origin: None });
    let frontier = br#"{"clickstream":30000}"#;
    bus.send(&cfg.events_topic, Some(0), None, &w.take(), &[(FRAME_HEADER, frame::FRAME_VERSION), (frame::FRONTIER_HEADER, frontier)]).await.unwrap();
    let mut told: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    let mut origins = Vec::new();
    while told.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(20), keyed.recv()).await.expect("every keyed partition hears of the watermark").unwrap();
        if m.header(FRAME_HEADER).is_some() {
            origins.extend(frame::entries(&m.payload).map(|e| e.unwrap().origin.map(|o| (o.partition, o.offset, o.index))));
        }
        let w: i64 = match (m.header("cepheid-watermarks"), m.header("cepheid-watermark")) {
            (Some(marks), _) => serde_json::from_slice::<std::collections::BTreeMap<String, i64>>(marks).unwrap()["clickstream"],
            (None, Some(w)) => String::from_utf8_lossy(w).parse().unwrap(),
            (None, None) => continue,
        };
        told.insert(m.partition, w);
    }
    assert_eq!(told.values().copied().collect::<Vec<_>>(), vec![28_000; 3], "the post's frontier less the 2 s bound, on every partition: {told:?}");
    assert_eq!(origins, vec![Some((0, 0, 0)), Some((0, 0, 1))], "each event of the post with its place in the events topic's record");
    stop.send(()).unwrap();
    let report = handle.await.unwrap().unwrap();
    assert_eq!(report.watermarks_sent, 2, "the two partitions without a frame, each told once: {report:?}");
    cepheid_state::delete_prefix("redis://127.0.0.1:6379", &prefix).await.unwrap();
}
