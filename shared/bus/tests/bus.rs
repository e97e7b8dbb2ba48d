//! The bus contract, on the in-memory bus always and on a real
//! Kafka-protocol broker when `CEPHEID_KAFKA_BOOTSTRAP` names one (CI starts
//! `tansu` for this; see `.ci/run`).

use std::time::Duration;

use cepheid_bus::{partition_for, Bus, KafkaConfig};

async fn contract(bus: Bus, topic: &str) {
    bus.create_topic(topic, 3).await.unwrap();
    bus.create_topic(topic, 3).await.unwrap(); // idempotent
    assert_eq!(bus.partitions(topic).await.unwrap(), 3);
    let mut sent = Vec::new();
    for i in 0..9 {
        let key = format!("user-{i}");
        let (p, _off) = bus.send(topic, None, Some(key.as_bytes()), format!("event {i}").as_bytes(), &[("trace", b"t1")]).await.unwrap();
        assert_eq!(p, partition_for(key.as_bytes(), 3));
        sent.push((p, format!("event {i}")));
    }
    let group = format!("{topic}-g");
    let mut c = bus.subscribe(&group, &[topic]).unwrap();
    let mut got = Vec::new();
    for _ in 0..9 {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv()).await.expect("a record within 30 s").unwrap();
        assert_eq!(m.header("trace"), Some(&b"t1"[..]));
        got.push((m.partition, String::from_utf8(m.payload.clone()).unwrap(), m.offset));
    }
    let mut a: Vec<(i32, String)> = got.iter().map(|(p, s, _)| (*p, s.clone())).collect();
    a.sort();
    sent.sort();
    assert_eq!(a, sent);
    // Per partition, offsets come in order.
    for p in 0..3 {
        let offs: Vec<i64> = got.iter().filter(|g| g.0 == p).map(|g| g.2).collect();
        assert!(offs.windows(2).all(|w| w[0] < w[1]), "{offs:?}");
    }
    // Each partition's bounds: its records lie between offset 0 and the count sent to it.
    for p in 0..3 {
        let n = sent.iter().filter(|s| s.0 == p).count() as i64;
        assert_eq!(c.bounds(topic, p).await.unwrap(), (0, n), "partition {p}");
    }
    // Commit the first partition's first record only; a new member resumes after it.
    let first = got.iter().find(|g| g.0 == got[0].0).unwrap();
    c.commit(topic, first.0, first.2 + 1).unwrap();
    for (p, _, off) in &got {
        if *p != first.0 {
            c.commit(topic, *p, off + 1).unwrap();
        }
    }
    drop(c);
    bus.send(topic, Some(first.0), None, b"later", &[]).await.unwrap();
    let mut c2 = bus.subscribe(&group, &[topic]).unwrap();
    let expected = got.iter().filter(|g| g.0 == first.0).count() - 1 + 1;
    let mut again = Vec::new();
    for _ in 0..expected {
        let m = tokio::time::timeout(Duration::from_secs(30), c2.recv()).await.expect("resumed records").unwrap();
        again.push(String::from_utf8(m.payload).unwrap());
    }
    assert_eq!(again.last().unwrap(), "later");
    assert!(!again.contains(&first.1), "the committed record came back");
    resume_inside_a_batch(&bus, &format!("{topic}-batched")).await;
}

/// Records enqueued together travel in one record batch; a member resuming at
/// a committed offset inside it, or seeking into it, must get exactly that
/// record next (tansu 0.6 answers such a fetch with the following batch).
async fn resume_inside_a_batch(bus: &Bus, topic: &str) {
    bus.create_topic(topic, 1).await.unwrap();
    let mut acks = Vec::new();
    for i in 0..100 {
        acks.push(bus.enqueue(topic, Some(0), None, format!("r{i}").as_bytes(), &[]).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
    async fn next(c: &mut cepheid_bus::Consumer) -> (i64, String) {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv()).await.expect("a record within 30 s").unwrap();
        (m.offset, String::from_utf8(m.payload).unwrap())
    }
    let group = format!("{topic}-g");
    // Read as the services read their own topics (holes read again): resuming
    // and seeking back and forth inside a batch is not taken for a hole.
    let mut c = bus.subscribe(&group, &[topic]).unwrap().contiguous();
    assert_eq!(next(&mut c).await, (0, "r0".to_string()));
    c.commit(topic, 0, 40).unwrap();
    drop(c);
    // A later batch. (tansu answers a fetch inside the partition's last batch
    // with nothing at all, so the consumer learns of the skipped rest of that
    // batch only when a later batch arrives; it then reads back.)
    bus.send(topic, Some(0), None, b"r100", &[]).await.unwrap();
    let mut c = bus.subscribe(&group, &[topic]).unwrap().contiguous();
    assert_eq!(next(&mut c).await, (40, "r40".to_string()), "resumed at the committed offset");
    assert_eq!(next(&mut c).await, (41, "r41".to_string()));
    c.seek(topic, 0, 70).await.unwrap();
    assert_eq!(next(&mut c).await, (70, "r70".to_string()), "read on from the sought offset");
    assert_eq!(next(&mut c).await, (71, "r71".to_string()));
    c.seek(topic, 0, 5).await.unwrap();
    assert_eq!(next(&mut c).await, (5, "r5".to_string()));
    assert_eq!(next(&mut c).await, (6, "r6".to_string()));
    // And on to the end, each record once.
    for i in 7..=100 {
        assert_eq!(next(&mut c).await, (i, format!("r{i}")));
    }
    assert_eq!(c.holes_read_again(), 0, "no resume or seek above is a hole");
}

#[tokio::test]
async fn memory_bus_contract() {
    contract(Bus::memory(), "events").await;
}

#[tokio::test]
async fn kafka_bus_contract() {
    let Ok(bootstrap) = std::env::var("CEPHEID_KAFKA_BOOTSTRAP") else {
        eprintln!("kafka_bus_contract: CEPHEID_KAFKA_BOOTSTRAP is not set; run through .ci/run (which starts a broker) to include Kafka");
        return;
    };
    let bus = Bus::kafka(&KafkaConfig { bootstrap, properties: vec![] }).unwrap();
    let topic = format!("cepheid-test-{}", std::process::id());
    contract(bus, &topic).await;
}

#[tokio::test]
async fn a_failed_subscribe_does_not_join_the_group() {
    let bus = Bus::memory();
    assert!(bus.subscribe("g", &["later"]).is_err());
    bus.create_topic("later", 2).await.unwrap();
    bus.send("later", Some(0), None, b"a", &[]).await.unwrap();
    bus.send("later", Some(1), None, b"b", &[]).await.unwrap();
    let mut c = bus.subscribe("g", &["later"]).unwrap();
    let mut got = vec![c.recv().await.unwrap().payload, c.recv().await.unwrap().payload];
    got.sort();
    assert_eq!(got, vec![b"a".to_vec(), b"b".to_vec()], "the only member reads every partition");
}

/// The first record of a freshly assigned partition is checked against the
/// group's committed offset; when that lookup fails (the coordinator
/// unreachable), the record must come again at the next `recv`, not be lost.
/// librdkafka's mock cluster fails the lookup: the first OffsetFetch (the
/// consumer's own, at assignment) answers, the next ones (the bus's lookup)
/// get an error.
#[tokio::test]
async fn a_failed_committed_lookup_loses_no_record() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (mock, bus) = mock_with_records(5).await;
    mock.request_errors(
        RDKafkaApiKey::OffsetFetch,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED,
        ],
    );
    let mut c = bus.subscribe("g", &["t"]).unwrap();
    let first = c.recv().await;
    assert!(first.is_err(), "the lookup was to fail once: {first:?}");
    for i in 0..5 {
        let m = c.recv().await.unwrap();
        assert_eq!((m.offset, m.payload), (i, format!("r{i}").into_bytes()), "record {i}");
    }
}

/// Services call `recv` inside `tokio::select!`, which drops the call when
/// another branch is ready first. A call dropped while the first record of a
/// fresh partition waits for the group's committed offset (a round trip to
/// the broker, made slow here) must not lose that record: the next call goes
/// on with it. Every call below is cut off after 20 ms; the broker answers
/// each request 100 ms late.
#[tokio::test]
async fn a_cancelled_recv_loses_no_record() {
    use std::time::{Duration, Instant};
    let (mock, bus) = mock_with_records(5).await;
    mock.broker_round_trip_time(1, Duration::from_millis(100)).unwrap();
    let mut c = bus.subscribe("g", &["t"]).unwrap();
    let (start, mut got, mut cut) = (Instant::now(), Vec::new(), 0);
    while got.last() != Some(&4) {
        assert!(start.elapsed() < Duration::from_secs(60), "only {got:?} after 60 s ({cut} calls cut off)");
        match tokio::time::timeout(Duration::from_millis(20), c.recv()).await {
            Ok(m) => got.push(m.unwrap().offset),
            Err(_) => cut += 1,
        }
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4], "a record was lost to a call cut off");
    assert!(cut > 0);
}

/// A call that waits for the broker (a partition's bounds, at every partition
/// a shard takes; the committed offsets inside `recv`) leaves the runtime's
/// thread to the other tasks meanwhile: on this single-threaded runtime, a
/// task spawned just before the call runs before the call returns. (Made on
/// the calling thread, the call would return first: nothing else runs until
/// it yields.)
#[tokio::test]
async fn broker_calls_do_not_hold_the_thread() {
    let (_mock, bus) = mock_with_records(1).await;
    let c = bus.subscribe("g", &["t"]).unwrap();
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = ran.clone();
    tokio::spawn(async move { r.store(true, std::sync::atomic::Ordering::SeqCst) });
    assert_eq!(c.bounds("t", 0).await.unwrap(), (0, 1));
    assert!(ran.load(std::sync::atomic::Ordering::SeqCst), "the runtime's thread was held while the broker answered");
}

/// librdkafka's mock cluster with topic `t` (one partition) holding records
/// `r0`, `r1`, … (the mock broker cannot create topics through the admin API).
async fn mock_with_records(n: usize) -> (rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>, Bus) {
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let bus = Bus::kafka(&KafkaConfig { bootstrap: mock.bootstrap_servers(), properties: vec![] }).unwrap();
    mock.create_topic("t", 1, 1).unwrap();
    for i in 0..n {
        bus.send("t", Some(0), None, format!("r{i}").as_bytes(), &[]).await.unwrap();
    }
    (mock, bus)
}
