//! A matcher shard alone, reading frames of events written by hand: the events
//! of a frame are matched, the watermarks it carries apply after them, and an
//! event it cannot use (late at the shard, or a damaged rest of a frame) goes
//! to the dead-letter topic naming the frame entry it came from. A frame's
//! watermark releases at once when no other record is waiting. Events still
//! waiting for the watermark at a checkpoint are read again from the topic by
//! the next shard (and those of an earlier version's meta restored from it);
//! a keyed topic recreated under a checkpoint is read from its start as new.
//! An event a router sends again (same events-topic position) is taken once,
//! also across a restart. Running keys stay within `max_running_keys`.

use std::sync::Arc;
use std::time::Duration;

use cepheid_bus::frame::{Entry, FrameWriter, Origin, FRAME_HEADER, FRAME_VERSION, ORIGIN_TOPIC_HEADER};
use cepheid_bus::Bus;
use cepheid_engine::engine::EngineConfig;
use cepheid_matcher_shard::checkpoint::Meta;
use cepheid_matcher_shard::ShardConfig;
use cepheid_state::rules::RedisRuleStore;
use cepheid_types::MatchRecord;

const REDIS: &str = "redis://127.0.0.1:6379";

/// A frame entry as the tests write it: `(key, time, payload)`.
type Event = (String, i64, String);

fn event(t: i64, user: i64) -> String {
    format!(r#"{{"eventTime":{t},"kind":"buy","userId":{user}}}"#)
}

async fn recv(c: &mut cepheid_bus::Consumer, what: &str) -> cepheid_bus::Message {
    tokio::time::timeout(Duration::from_secs(20), c.recv()).await.unwrap_or_else(|_| panic!("no {what}")).unwrap()
}

/// One shard's surroundings: the rule `buys` (every buy of a user matches) in
/// a rule store of its own, a memory bus with a one-partition keyed topic and
/// a dead-letter topic.
struct Setup {
    rule: String,
    prefix: String,
    store: RedisRuleStore,
    bus: Bus,
    cfg: ShardConfig,
}

type Running = (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<cepheid_matcher_shard::Report>>);

impl Setup {
    async fn new(name: &str) -> Setup {
        Setup::with_rule(name, r#"{"id":"buys","version":1,"key_by":"userId","pattern":[{"name":"a","where":"kind = 'buy'"}]}"#).await
    }

    async fn with_rule(name: &str, rule: &str) -> Setup {
        let tag = format!("{name}-{}", std::process::id());
        let prefix = format!("cepheid-test:{tag}");
        let store = RedisRuleStore::connect(REDIS, &prefix).await.unwrap();
        let rule = cepheid_rules::parse_rule_json(rule).unwrap();
        store.apply(&rule).await.unwrap();
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
        let bus = Bus::memory();
        bus.create_topic(&cfg.keyed_topic, 1).await.unwrap();
        bus.create_topic(&cfg.dead_letter_topic, 1).await.unwrap();
        Setup { rule: rule.id.clone(), prefix, store, bus, cfg }
    }

    /// A reader of the dead-letter topic, from its beginning.
    fn dead_letters(&self) -> cepheid_bus::Consumer {
        self.bus.subscribe("dead-reader", &[self.cfg.dead_letter_topic.as_str()]).unwrap()
    }

    /// Sends router `r1`'s watermark `w` as a record of its own (it releases at once).
    async fn send_watermark(&self, w: i64) {
        let w = w.to_string();
        let headers = [("cepheid-watermark", w.as_bytes()), ("cepheid-source", &b"clickstream"[..]), ("cepheid-router", &b"r1"[..])];
        self.bus.send(&self.cfg.keyed_topic, Some(0), None, b"", &headers).await.unwrap();
    }

    /// The Redis key of the partition's checkpoint meta.
    fn meta_key(&self) -> String {
        format!("{}:shard:{{{}-0}}:meta", self.prefix, self.cfg.keyed_topic)
    }

    async fn read_meta(&self) -> Meta {
        let mut redis = redis::Client::open(REDIS).unwrap().get_multiplexed_async_connection().await.unwrap();
        let meta: String = redis::cmd("GET").arg(self.meta_key()).query_async(&mut redis).await.unwrap();
        serde_json::from_str(&meta).unwrap()
    }

    async fn write_meta(&self, meta: &serde_json::Value) {
        let mut redis = redis::Client::open(REDIS).unwrap().get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET").arg(self.meta_key()).arg(meta.to_string()).query_async(&mut redis).await.unwrap();
    }

    /// Starts a shard; the sender stops it, the handle gives its report.
    fn start(&self) -> Running {
        self.start_on(None)
    }

    /// Starts a shard serving its probes and metrics on `http`.
    fn start_on(&self, http: Option<tokio::net::TcpListener>) -> Running {
        let deps = cepheid_matcher_shard::Deps {
            bus: self.bus.clone(),
            rules: self.store.clone(),
            redis_url: REDIS.into(),
            prefix: self.prefix.clone(),
            clock: Arc::new(cepheid_types::SystemClock),
            telemetry: Default::default(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shard = tokio::spawn(cepheid_matcher_shard::run(self.cfg.clone(), EngineConfig::default(), deps, http, async move {
            let _ = stopped.await;
        }));
        (stop, shard)
    }

    /// A reader of the matches topic (once the shard created it).
    async fn matches(&self) -> cepheid_bus::Consumer {
        loop {
            if let Ok(c) = self.bus.subscribe("reader", &[self.cfg.matches_topic.as_str()]) {
                return c;
            }
            tokio::task::yield_now().await;
        }
    }

    /// Sends a frame of `(key, time, payload)` entries, cut short by `cut` bytes, with the router `r1`'s watermark.
    async fn send_frame(&self, entries: &[(String, i64, String)], watermark: Option<i64>, cut: usize) {
        let entries: Vec<_> = entries.iter().map(|e| (None, e.clone())).collect();
        self.send_entries(None, &entries, watermark, cut).await
    }

    /// Sends a frame of entries as a router reading events topic `topic`
    /// writes them: each with where the router read its event (events
    /// partition, offset, index in the record).
    async fn send_frame_from(&self, topic: &str, entries: &[((i32, i64, u32), Event)], watermark: Option<i64>) {
        let entries: Vec<_> = entries.iter().map(|((partition, offset, index), e)| ((0, *partition, *offset, *index), e.clone())).collect();
        self.send_frame_streams(topic, &entries, watermark).await
    }

    /// Sends a frame naming the origin streams `streams` (comma-separated),
    /// each entry with its origin (stream index, partition, offset, index).
    async fn send_frame_streams(&self, streams: &str, entries: &[(At, Event)], watermark: Option<i64>) {
        let entries: Vec<_> =
            entries.iter().map(|((stream, partition, offset, index), e)| (Some(Origin { stream: *stream, partition: *partition, offset: *offset, index: *index }), e.clone())).collect();
        self.send_entries(Some(streams), &entries, watermark, 0).await
    }

    async fn send_entries(&self, topic: Option<&str>, entries: &[(Option<Origin>, Event)], watermark: Option<i64>, cut: usize) {
        let mut w = FrameWriter::default();
        for (origin, (key, t, payload)) in entries {
            w.push(&Entry { key: key.as_bytes(), time: *t, source: "clickstream", trace: None, payload: payload.as_bytes(), origin: *origin });
        }
        let mut payload = w.take();
        payload.truncate(payload.len() - cut);
        let marks = watermark.map(|w| format!(r#"{{"clickstream":{w}}}"#)).unwrap_or_default();
        let mut headers = vec![(FRAME_HEADER, FRAME_VERSION)];
        if let Some(t) = topic {
            headers.push((ORIGIN_TOPIC_HEADER, t.as_bytes()));
        }
        if watermark.is_some() {
            headers.extend([("cepheid-watermarks", marks.as_bytes()), ("cepheid-router", &b"r1"[..])]);
        }
        self.bus.send(&self.cfg.keyed_topic, Some(0), None, &payload, &headers).await.unwrap();
    }

    async fn clean_up(self) {
        self.store.delete(&self.rule).await.unwrap();
        cepheid_state::delete_prefix(REDIS, &self.prefix).await.unwrap();
    }
}

/// An entry's origin: stream index, partition, offset, index in the record.
type At = (u32, i32, i64, u32);

/// The user of a match record.
fn user_of(m: &cepheid_bus::Message) -> i64 {
    MatchRecord::from_json_line(std::str::from_utf8(&m.payload).unwrap()).unwrap().key["userId"].as_i64().unwrap()
}

/// The users of the next `n` match records, sorted.
async fn match_users(matches: &mut cepheid_bus::Consumer, n: usize) -> Vec<i64> {
    let mut users = Vec::with_capacity(n);
    for _ in 0..n {
        users.push(user_of(&recv(matches, "match").await));
    }
    users.sort();
    users
}

/// A buy of user `user` at `t`, as a frame entry of its key.
fn buy(user: i64, t: i64) -> (String, i64, String) {
    (format!("userId|{user}"), t, event(t, user))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_matched_and_their_bad_entries_dead_lettered() {
    let setup = Setup::new("frames").await;
    let cfg = setup.cfg.clone();
    let (stop, shard) = setup.start();
    let mut matches = setup.matches().await;

    // Two keys' events, then the router's watermark past both: two matches.
    setup.send_frame(&[buy(1, 1_000), buy(2, 1_500)], Some(5_000), 0).await;
    assert_eq!(match_users(&mut matches, 2).await, vec![1, 2]);

    // An event behind the partition's watermark, a good one, and a frame cut short in its third entry.
    setup.send_frame(&[buy(3, 4_000), buy(4, 6_000), buy(5, 7_000)], Some(9_000), 3).await;
    assert_eq!(user_of(&recv(&mut matches, "match").await), 4, "only the good event of the second frame matches");
    let mut dead = setup.dead_letters();
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
    setup.clean_up().await;
}

/// A checkpoint does not copy the events still waiting for the watermark: it
/// records where to read them again. A shard stopped with events waiting
/// (one of them in a frame whose other entries were released, one dead-lettered
/// as late) is followed by another: it reads those records again, holds
/// exactly the waiting events, and dead-letters nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_events_are_read_again_after_a_restart() {
    let setup = Setup::new("replay").await;
    let (stop, shard) = setup.start();
    let mut matches = setup.matches().await;

    // Offset 0: released at once. Offset 1: one event released, one waiting. Offset 2:
    // one late (dead-lettered), one waiting. Offset 3: the same (its dead letter tells it was read).
    setup.send_frame(&[buy(1, 1_000)], Some(2_000), 0).await;
    assert_eq!(user_of(&recv(&mut matches, "match").await), 1);
    setup.send_frame(&[buy(2, 3_000), buy(3, 6_000)], Some(4_000), 0).await;
    assert_eq!(user_of(&recv(&mut matches, "match").await), 2);
    setup.send_frame(&[buy(4, 3_500), buy(5, 7_000)], Some(4_000), 0).await;
    setup.send_frame(&[buy(7, 3_900), buy(6, 8_000)], Some(4_000), 0).await;
    let mut dead = setup.dead_letters();
    assert_eq!(recv(&mut dead, "dead letter").await.payload, event(3_500, 4).as_bytes());
    assert_eq!(recv(&mut dead, "dead letter").await.payload, event(3_900, 7).as_bytes());
    stop.send(()).unwrap();
    let first = shard.await.unwrap().unwrap();
    assert_eq!((first.events, first.matches, first.late), (7, 2, 2), "{first:?}");

    // The stored position: read again from offset 1 (its event for user 3 waits), all four read.
    let meta = setup.read_meta().await;
    assert_eq!((meta.offset, meta.read, meta.released, meta.pending.len()), (1, Some(4), 4_000, 0), "{meta:?}");

    let (stop, shard) = setup.start();
    setup.send_frame(&[buy(8, 9_000)], Some(10_000), 0).await;
    assert_eq!(match_users(&mut matches, 4).await, vec![3, 5, 6, 8], "exactly the events that were waiting, each once, and the new one");
    stop.send(()).unwrap();
    let second = shard.await.unwrap().unwrap();
    // Read again: 3 waiting events held, 3 skipped (one released, two late); nothing dead-lettered again.
    assert_eq!((second.replayed, second.replayed_skipped, second.events, second.late, second.matches), (3, 3, 1, 0, 4), "{second:?}");
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(200), dead.recv()).await {
        let m = m.unwrap();
        panic!("a dead letter was sent twice: {:?} {}", m.header("cepheid-reason").map(String::from_utf8_lossy), String::from_utf8_lossy(&m.payload));
    }
    setup.clean_up().await;
}

/// A meta written by an earlier version carries its waiting events itself (and
/// no `read` offset): they are restored from it and released as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_events_in_a_meta_of_an_earlier_version_are_restored() {
    let setup = Setup::new("legacy-meta").await;
    // As stored before the waiting events were read again from the topic: one record read, one event waiting.
    let meta = serde_json::json!({
        "offset": 1, "released": 4000, "arrival": 1,
        "routers": [{"source": "clickstream", "router": "r1", "watermark": 4000}],
        "pending": [{"t": 5000, "arrival": 1, "source": "clickstream", "key": "userId|9", "raw": event(5_000, 9), "trace": null}]
    });
    setup.write_meta(&meta).await;
    // The record the meta says was read (not read again), then one with a new event and a watermark past both.
    setup.send_frame(&[buy(1, 4_500)], Some(4_000), 0).await;
    setup.send_frame(&[buy(2, 6_000)], Some(10_000), 0).await;
    let (stop, shard) = setup.start();
    let mut matches = setup.matches().await;
    assert_eq!(match_users(&mut matches, 2).await, vec![2, 9], "the carried event and the new one; the record before the meta's offset is not read again");
    stop.send(()).unwrap();
    let report = shard.await.unwrap().unwrap();
    assert_eq!((report.events, report.replayed, report.matches), (1, 0, 2), "{report:?}");
    setup.clean_up().await;
}

/// While a restored partition reads its records again, nothing is released,
/// not even by a watermark record that releases at once: the restored
/// watermark may be ahead of the released one (a release was still due when
/// the checkpoint was taken), and releasing before the records are read
/// again would pass over the waiting events still to come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_released_while_records_are_read_again() {
    let setup = Setup::new("replay-hold").await;
    let (stop, shard) = setup.start();
    let mut matches = setup.matches().await;
    // 0: released. 1: waits. 2: a watermark record (releases at once; nothing is due).
    // 3: one waits, one is late (its dead letter tells the record was read).
    setup.send_frame(&[buy(1, 1_000)], Some(2_000), 0).await;
    assert_eq!(user_of(&recv(&mut matches, "match").await), 1);
    setup.send_frame(&[buy(3, 6_000)], Some(2_000), 0).await;
    setup.send_watermark(2_500).await;
    setup.send_frame(&[buy(5, 7_000), buy(7, 1_500)], Some(2_500), 0).await;
    let mut dead = setup.dead_letters();
    assert_eq!(recv(&mut dead, "dead letter").await.payload, event(1_500, 7).as_bytes());
    stop.send(()).unwrap();
    let first = shard.await.unwrap().unwrap();
    assert_eq!((first.events, first.matches, first.watermarks, first.late), (4, 1, 1, 1), "{first:?}");

    // As if the router's watermark 9 000 had arrived with the last record read and its release were still due.
    let mut meta = setup.read_meta().await;
    assert_eq!((meta.offset, meta.read, meta.released), (1, Some(4), 2_500), "{meta:?}");
    meta.routers[0].watermark = 9_000;
    setup.write_meta(&serde_json::to_value(&meta).unwrap()).await;

    let (stop, shard) = setup.start();
    setup.send_frame(&[buy(8, 9_500)], Some(10_000), 0).await;
    assert_eq!(match_users(&mut matches, 3).await, vec![3, 5, 8], "the event read again after the watermark record is not passed over");
    stop.send(()).unwrap();
    let second = shard.await.unwrap().unwrap();
    assert_eq!((second.replayed, second.replayed_skipped, second.events, second.matches), (2, 1, 1, 3), "{second:?}");
    setup.clean_up().await;
}

/// A keyed topic recreated under a checkpoint (its log now ends before the
/// checkpoint's read position): its records are new, read from its start and
/// matched, not passed over as if the checkpoint had folded them in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_recreated_topic_are_read_as_new() {
    let setup = Setup::new("recreated").await;
    // The checkpoint of the earlier topic: 60 records read, the first 50 folded in.
    setup
        .write_meta(&serde_json::json!({
            "offset": 50, "read": 60, "released": 4000, "arrival": 70,
            "routers": [{"source": "clickstream", "router": "r1", "watermark": 4000}]
        }))
        .await;
    setup.send_frame(&[buy(1, 5_000)], Some(4_000), 0).await;
    setup.send_frame(&[buy(2, 6_000)], Some(10_000), 0).await;
    let (stop, shard) = setup.start();
    let mut matches = setup.matches().await;
    assert_eq!(match_users(&mut matches, 2).await, vec![1, 2]);
    stop.send(()).unwrap();
    let report = shard.await.unwrap().unwrap();
    assert_eq!((report.log_resets, report.events, report.replayed, report.replayed_skipped), (1, 2, 0, 0), "{report:?}");
    let meta = setup.read_meta().await;
    assert_eq!((meta.offset, meta.read), (2, Some(2)), "the new log's positions: {meta:?}");
    setup.clean_up().await;
}

/// A router that takes over an events partition reads it again from its
/// predecessor's last committed offset, and sends again what the predecessor
/// had already sent: the shard takes each events-topic position once — per
/// events topic and partition, judged record by record (an event routed to two keys of a
/// partition has one origin in one frame) — and after a restart it still
/// does, while the records it reads again are judged among themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_router_sends_again_are_taken_once() {
    let setup = Setup::new("repeats").await;
    let (stop, shard) = setup.start();
    let mut matches = setup.matches().await;

    // Offset 0: events of events-topic records 10 and 11 (11's event twice, as two routes); no watermark yet.
    setup.send_frame_from("events", &[((0, 10, 0), buy(1, 1_000)), ((0, 10, 1), buy(2, 1_100)), ((0, 11, 0), buy(3, 1_200)), ((0, 11, 0), buy(3, 1_200))], None).await;
    // Offset 1: another events partition, further back in its own offsets, and
    // the same position of another events topic (a second router group).
    setup.send_frame_from("events", &[((1, 5, 0), buy(5, 1_400))], None).await;
    setup.send_frame_from("orders", &[((0, 10, 0), buy(9, 1_450))], None).await;
    // Offset 3: the successor from record 10 on, then one new event; its watermark releases them all.
    setup.send_frame_from("events", &[((0, 10, 0), buy(1, 1_000)), ((0, 10, 1), buy(2, 1_100)), ((0, 11, 0), buy(3, 1_200)), ((0, 11, 0), buy(3, 1_200)), ((0, 12, 0), buy(4, 1_300))], Some(5_000)).await;
    assert_eq!(match_users(&mut matches, 7).await, vec![1, 2, 3, 3, 4, 5, 9], "each event once (user 3's two routes both)");
    // Offset 4: an event left waiting; offset 5: it again; offset 6: a late
    // event (its dead letter tells that the records before it were read).
    setup.send_frame_from("events", &[((0, 13, 0), buy(6, 6_000))], Some(5_000)).await;
    setup.send_frame_from("events", &[((0, 13, 0), buy(6, 6_000))], Some(5_000)).await;
    setup.send_frame_from("events", &[((0, 14, 0), buy(8, 4_000))], Some(5_000)).await;
    assert_eq!(recv(&mut setup.dead_letters(), "dead letter").await.payload, event(4_000, 8).as_bytes());
    stop.send(()).unwrap();
    let first = shard.await.unwrap().unwrap();
    assert_eq!((first.events, first.duplicates, first.late, first.matches), (9, 5, 1, 7), "{first:?}");
    let meta = setup.read_meta().await;
    assert_eq!((meta.offset, meta.read), (4, Some(7)), "{meta:?}");
    let origins: Vec<(&str, i32, i64, u32)> = meta.origins.iter().map(|o| (o.topic.as_str(), o.partition, o.offset, o.index)).collect();
    assert_eq!(origins, vec![("events", 0, 14, 0), ("events", 1, 5, 0), ("orders", 0, 10, 0)], "the latest position taken per events topic and partition");

    // Restarted: offsets 4 to 6 are read again; 4's event is held again (a
    // position before the stored one, but read first among these), 5's is
    // still the repeat, 6's was late.
    let (stop, shard) = setup.start();
    setup.send_frame_from("events", &[((0, 15, 0), buy(7, 6_500)), ((0, 13, 0), buy(6, 6_000))], Some(7_000)).await;
    assert_eq!(match_users(&mut matches, 2).await, vec![6, 7], "the waiting event once, and the new one");
    stop.send(()).unwrap();
    let second = shard.await.unwrap().unwrap();
    assert_eq!((second.replayed, second.replayed_skipped, second.events, second.duplicates, second.matches), (1, 2, 1, 1, 2), "{second:?}");
    if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), matches.recv()).await {
        panic!("a match too many: user {}", user_of(&m));
    }
    setup.clean_up().await;
}

/// Events ingest forwarded from a raw topic carry the raw record as their
/// origin, in a stream per raw topic and events partition (`RAW via
/// EVENTS/P`): ingest forwarding them again after a restart (new events
/// offsets, same raw positions) is taken once. Streams are judged apart, a
/// frame's list names them in any order, and an origin naming no stream of
/// its list is taken as it is.
#[tokio::test]
async fn events_ingest_forwards_again_are_taken_once_per_stream() {
    let setup = Setup::new("raw-repeats").await;
    let (stop, shard) = setup.start();
    let mut matches = setup.matches().await;
    let (posted, raw0, raw1) = ("events", "click via events/0", "click via events/1");

    // Offset 0: a posted event and two forwarded from raw partition 0 via events partition 0.
    let both = format!("{posted},{raw0}");
    setup.send_frame_streams(&both, &[((0, 0, 3, 0), buy(1, 1_000)), ((1, 0, 100, 0), buy(2, 1_100)), ((1, 0, 101, 0), buy(3, 1_200))], None).await;
    // Offset 1: raw partition 0 via events partition 1 (the list in another
    // order): a stream of its own, though behind the other's position.
    setup.send_frame_streams(&format!("{raw1},{posted}"), &[((0, 0, 50, 0), buy(4, 1_300))], None).await;
    // Offset 2: ingest restarted and forwarded raw records 100 and 101 again,
    // then a new one; the posted event once more (the router read again); an
    // origin in stream 7 of a list of two.
    setup
        .send_frame_streams(
            &both,
            &[((1, 0, 100, 0), buy(2, 1_100)), ((1, 0, 101, 0), buy(3, 1_200)), ((0, 0, 3, 0), buy(1, 1_000)), ((1, 0, 102, 0), buy(5, 1_400)), ((7, 0, 1, 0), buy(6, 1_450))],
            Some(5_000),
        )
        .await;
    assert_eq!(match_users(&mut matches, 6).await, vec![1, 2, 3, 4, 5, 6], "each event once");
    stop.send(()).unwrap();
    let report = shard.await.unwrap().unwrap();
    assert_eq!((report.events, report.duplicates, report.matches), (6, 3, 6), "{report:?}");
    if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), matches.recv()).await {
        panic!("a match too many: user {}", user_of(&m));
    }
    let meta = setup.read_meta().await;
    let origins: Vec<(&str, i32, i64, u32)> = meta.origins.iter().map(|o| (o.topic.as_str(), o.partition, o.offset, o.index)).collect();
    assert_eq!(origins, vec![(raw0, 0, 102, 0), (raw1, 0, 50, 0), (posted, 0, 3, 0)], "the latest position taken per stream and partition");
    setup.clean_up().await;
}

/// The value of a shard metric (0 when not served yet).
async fn metric(url: &str, name: &str) -> f64 {
    let Ok(r) = reqwest::get(format!("{url}/metrics")).await else { return 0.0 };
    let text = r.text().await.unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' '))).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// With `max_running_keys`, a checkpoint passivates the least recently used
/// stored keys beyond the bound however recently they were used (idle
/// passivation is an hour away here): a burst of new keys does not grow the
/// running actors past it, and the passivated keys come back from Redis with
/// their partial matches when their next events arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_keys_stay_within_the_bound() {
    let mut s = Setup::with_rule(
        "bound",
        r#"{"id":"pairs","version":1,"key_by":"userId","pattern":[{"name":"a","where":"kind = 'buy'"},{"name":"b","where":"kind = 'buy'"}]}"#,
    )
    .await;
    s.cfg.checkpoint_interval_ms = 100;
    s.cfg.passivate_after_ms = 3_600_000;
    s.cfg.max_running_keys = 10;
    let users = 100;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, shard) = s.start_on(Some(listener));
    let mut matches = s.matches().await;
    // Each user's first buy: a partial match per key, 100 keys running.
    let first: Vec<Event> = (0..users).map(|u| buy(u, 1_000 + u)).collect();
    s.send_frame(&first, Some(1_000 + users), 0).await;
    // A checkpoint stores them, then passivates all but the 10 used last.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while metric(&url, "cepheid_shard_passivated_for_bound_total").await < (users - 10) as f64 || metric(&url, "cepheid_shard_active_keys").await > 10.0 {
        assert!(tokio::time::Instant::now() < deadline, "running keys never came down to the bound");
        tokio::task::yield_now().await;
    }
    // Each user's second buy completes its match: 90 keys come back from Redis.
    let second: Vec<Event> = (0..users).map(|u| buy(u, 5_000 + u)).collect();
    s.send_frame(&second, Some(5_000 + users), 0).await;
    assert_eq!(match_users(&mut matches, users as usize).await, (0..users).collect::<Vec<_>>());
    stop.send(()).unwrap();
    let report = shard.await.unwrap().unwrap();
    assert!(report.restored_keys >= (users - 10) as u64, "{report:?}");
    assert!(report.passivated_for_bound >= (users - 10) as u64, "{report:?}");
    s.clean_up().await;
}
