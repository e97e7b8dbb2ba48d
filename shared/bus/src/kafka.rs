//! Kafka through rdkafka (librdkafka built from source by rdkafka-sys; Debian's
//! older librdkafka does not work with every Kafka-protocol broker).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::{BusError, Message};

/// Connection settings: `bootstrap` plus any librdkafka property
/// (`security.protocol`, `sasl.mechanisms`, `ssl.ca.location`, …).
#[derive(Clone, Debug, Default)]
pub struct KafkaConfig {
    pub bootstrap: String,
    pub properties: Vec<(String, String)>,
}

impl KafkaConfig {
    fn client(&self) -> ClientConfig {
        self.client_with(&[])
    }

    /// A client with `defaults` that the configured properties may override.
    fn client_with(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

fn classify(e: KafkaError) -> BusError {
    let transient = match &e {
        KafkaError::MessageProduction(code) | KafkaError::MessageConsumption(code) | KafkaError::Global(code) => matches!(
            code,
            RDKafkaErrorCode::QueueFull
                | RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::OperationTimedOut
        ),
        KafkaError::MetadataFetch(_) => true,
        _ => false,
    };
    if transient {
        BusError::Transient(e.to_string())
    } else {
        BusError::Refused(e.to_string())
    }
}

pub struct KafkaBus {
    cfg: KafkaConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    partitions: Mutex<HashMap<String, i32>>,
}

impl KafkaBus {
    pub fn new(cfg: &KafkaConfig) -> Result<KafkaBus, BusError> {
        // Defaults that `[kafka.properties]` may override. Records already go in
        // frames (many events each), so waiting 1 ms for more (librdkafka: 5) buys
        // little batching and costs latency at every hop. One request in flight per
        // broker: a request retried after a transient error cannot land after the
        // ones sent later, so a partition keeps the order its records were sent in
        // (a router's frame carries the watermark that follows its events; written
        // after a later frame, its events would count as late). Idempotent (Kafka's
        // own default since 3.0): a request the broker carried out but whose answer
        // was lost (a timeout, a dropped connection) is sent again, and without a
        // producer id and sequence the broker writes it twice — a router's frame
        // twice is its events twice for the shard (seen with librdkafka's mock
        // cluster: a, b, b, c; the mock does not drop such repeats for idempotent
        // producers that are not transactional, so no test here shows the remedy).
        // Off until 2026-12-07 because the broker-outage test once delivered two
        // alerts too many with it on; since the consumer's cancellation loss was
        // found and mended (212c44b) it passed 10 of 10 runs (BENCHMARKS.md,
        // "Idempotent producers, tried").
        let producer: FutureProducer = cfg
            .client_with(&[
                ("acks", "all"),
                ("enable.idempotence", "true"),
                ("max.in.flight.requests.per.connection", "1"),
                ("message.timeout.ms", "60000"),
                ("linger.ms", "1"),
            ])
            .create()
            .map_err(classify)?;
        let admin = cfg.client().create().map_err(classify)?;
        Ok(KafkaBus { cfg: cfg.clone(), producer, admin, partitions: Mutex::new(HashMap::new()) })
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), BusError> {
        // Provisioned already (the usual case after the first start, and the only one
        // where services may not create topics): nothing to ask the controller.
        if self.listed_partitions(topic).await?.is_some() {
            return Ok(());
        }
        let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let refused = match self.admin.create_topics(&[t], &opts).await {
            Ok(res) => res.into_iter().find_map(|r| match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => None,
                Err((name, code)) => Some(BusError::Refused(format!("creating topic {name}: {code}"))),
            }),
            Err(e) => Some(classify(e)),
        };
        self.partitions.lock().unwrap().remove(topic);
        match refused {
            None => Ok(()),
            // A broker that does not let this client create topics (no ACL for it, or no
            // CreateTopics API) is fine when the topic was provisioned beforehand.
            Some(e) => match self.partitions(topic).await {
                Ok(_) => {
                    tracing::warn!("bus: topic {topic} exists; creating it was refused ({e})");
                    Ok(())
                }
                Err(_) => Err(e),
            },
        }
    }

    /// A topic's partition count from the metadata of *all* topics (asking for
    /// one topic by name can make a broker auto-create it).
    async fn listed_partitions(&self, topic: &str) -> Result<Option<i32>, BusError> {
        let client = self.producer.clone();
        let t = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let md = client.client().fetch_metadata(None, Duration::from_secs(10)).map_err(classify)?;
            Ok(md.topics().iter().find(|mt| mt.name() == t && mt.error().is_none() && !mt.partitions().is_empty()).map(|mt| mt.partitions().len() as i32))
        })
        .await
        .map_err(|e| BusError::Transient(e.to_string()))?
    }

    pub async fn partitions(&self, topic: &str) -> Result<i32, BusError> {
        if let Some(n) = self.partitions.lock().unwrap().get(topic) {
            return Ok(*n);
        }
        let client = self.producer.clone();
        let t = topic.to_string();
        let n = tokio::task::spawn_blocking(move || {
            let md = client.client().fetch_metadata(Some(&t), Duration::from_secs(10)).map_err(classify)?;
            match md.topics().first() {
                Some(mt) if mt.error().is_none() && !mt.partitions().is_empty() => Ok(mt.partitions().len() as i32),
                _ => Err(BusError::UnknownTopic(t.clone())),
            }
        })
        .await
        .map_err(|e| BusError::Transient(e.to_string()))??;
        self.partitions.lock().unwrap().insert(topic.to_string(), n);
        Ok(n)
    }

    pub async fn send(&self, topic: &str, partition: i32, key: Option<&[u8]>, payload: &[u8], headers: &[(&str, &[u8])]) -> Result<(i32, i64), BusError> {
        match self.producer.send(record(topic, partition, key, payload, headers), Duration::from_secs(30)).await {
            Ok(d) => Ok((d.partition, d.offset)),
            Err((e, _)) => Err(classify(e)),
        }
    }

    /// Hands a record to the producer now (so records enqueued one after the
    /// other keep their order in a partition); the future resolves on the
    /// acknowledgement.
    pub fn enqueue(&self, topic: &str, partition: i32, key: Option<&[u8]>, payload: &[u8], headers: &[(&str, &[u8])]) -> Result<crate::Delivery, BusError> {
        match self.producer.send_result(record(topic, partition, key, payload, headers)) {
            Ok(f) => Ok(Box::pin(async move {
                match f.await {
                    Ok(Ok(d)) => Ok((d.partition, d.offset)),
                    Ok(Err((e, _))) => Err(classify(e)),
                    Err(_) => Err(BusError::Transient("the producer went away before the acknowledgement".into())),
                }
            })),
            Err((e, _)) => Err(classify(e)),
        }
    }

    pub fn subscribe(&self, group: &str, topics: &[&str]) -> Result<KafkaConsumer, BusError> {
        let ctx = GroupContext { lag: Arc::new(std::sync::atomic::AtomicI64::new(-1)), ..GroupContext::default() };
        let assignment = ctx.assignment.clone();
        let fresh = ctx.fresh.clone();
        let lag = ctx.lag.clone();
        // A fetch waits at most 2 ms for data (librdkafka's default is 500 ms):
        // Kafka answers as soon as there is any, but other Kafka-protocol
        // brokers (tansu 0.6) wait the whole time, data or not, and every hop
        // of the cluster adds it to the latency (see `loadtest --bin hop`).
        // Measured on tansu (BENCHMARKS.md): 5 -> 2 ms took the median
        // event-to-alert latency from 33 to 25 ms for 10 % more broker CPU;
        // 1 ms gained nothing more and cost 35 %.
        let consumer: StreamConsumer<GroupContext> = self
            .cfg
            .client_with(&[("fetch.wait.max.ms", "2"), ("session.timeout.ms", "10000")])
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("statistics.interval.ms", "5000")
            .create_with_context(ctx)
            .map_err(classify)?;
        consumer.subscribe(topics).map_err(classify)?;
        Ok(KafkaConsumer { consumer: Arc::new(consumer), assignment, fresh, lag, resume: Vec::new(), gaps: None, held: None, reread: None })
    }
}

/// The producer record of a message to send.
fn record<'a>(topic: &'a str, partition: i32, key: Option<&'a [u8]>, payload: &'a [u8], headers: &[(&str, &[u8])]) -> FutureRecord<'a, [u8], [u8]> {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header { key: k, value: Some(*v) });
    }
    let rec = FutureRecord::to(topic).partition(partition).payload(payload).headers(h);
    match key {
        Some(k) => rec.key(k),
        None => rec,
    }
}

/// (current assignment, changed since last read), shared with the rebalance callback.
type Assignment = Arc<Mutex<(Vec<(String, i32)>, bool)>>;

/// Records the partitions each rebalance leaves this member with.
#[derive(Default)]
struct GroupContext {
    /// (current assignment, changed since last read)
    assignment: Assignment,
    /// Partitions (re)assigned whose first record has not been read yet
    /// (a Vec: nearly always empty, searched without allocating).
    fresh: Arc<Mutex<Vec<(String, i32)>>>,
    /// Records of the assigned partitions after the committed offsets (from
    /// librdkafka's statistics, every few seconds); -1 before the first report.
    lag: Arc<std::sync::atomic::AtomicI64>,
}

impl ClientContext for GroupContext {
    fn stats(&self, stats: rdkafka::Statistics) {
        let assigned = self.assignment.lock().unwrap().0.clone();
        let lag: i64 = assigned
            .iter()
            .filter_map(|(t, p)| stats.topics.get(t).and_then(|tt| tt.partitions.get(p)))
            .map(|p| p.consumer_lag.max(0))
            .sum();
        self.lag.store(lag, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut a = self.assignment.lock().unwrap();
        let mut fresh = self.fresh.lock().unwrap();
        match rebalance {
            Rebalance::Assign(tpl) => {
                for e in tpl.elements() {
                    let tp = (e.topic().to_string(), e.partition());
                    if !fresh.contains(&tp) {
                        fresh.push(tp.clone());
                    }
                    if !a.0.contains(&tp) {
                        a.0.push(tp);
                    }
                }
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements() {
                    a.0.retain(|(t, p)| !(t == e.topic() && *p == e.partition()));
                    fresh.retain(|(t, p)| !(t == e.topic() && *p == e.partition()));
                }
            }
            Rebalance::Error(_) => return,
        }
        a.0.sort();
        a.1 = true;
    }
}

pub struct KafkaConsumer {
    /// Shared with the blocking threads that wait for the broker's answers
    /// (the committed offsets, [`KafkaConsumer::bounds`]).
    consumer: Arc<StreamConsumer<GroupContext>>,
    assignment: Assignment,
    fresh: Arc<Mutex<Vec<(String, i32)>>>,
    lag: Arc<std::sync::atomic::AtomicI64>,
    /// Partitions that must resume exactly at an offset (after a seek or an
    /// assignment); nearly always empty.
    resume: Vec<Resume>,
    /// With [`KafkaConsumer::contiguous`]: where each partition must go on.
    gaps: Option<crate::gaps::Gaps>,
    /// The record [`KafkaConsumer::recv`] is deciding about (kept across a
    /// cancelled call, and across a failed lookup of the committed offset).
    held: Option<Held>,
    /// A partition to read again after a short wait (see `contiguous`).
    reread: Option<ReadAgain>,
}

/// The group's committed offset for a partition (None when it has none): a
/// round trip to the group coordinator, once per partition and assignment, on
/// a blocking thread (see [`KafkaConsumer::recv`]).
fn committed(consumer: &StreamConsumer<GroupContext>, topic: &str, partition: i32) -> Result<Option<i64>, BusError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).map_err(classify)?;
    let Some(e) = got.find_partition(topic, partition) else { return Ok(None) };
    // An error for the partition leaves its offset unset: not "nothing committed".
    e.error().map_err(|e| BusError::Transient(format!("committed offset of {topic}/{partition}: {e}")))?;
    Ok(match e.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    })
}

/// A record taken from librdkafka and not yet delivered or dropped.
struct Held {
    m: Message,
    /// The first record of its partition since the partition was assigned.
    first: bool,
    /// The committed-offset lookup such a record waits for.
    lookup: Option<Lookup>,
}

enum Lookup {
    Due,
    Asked(tokio::task::JoinHandle<Result<Option<i64>, BusError>>),
}

/// A partition to read again from `from` at `at` (a hole in its offsets).
#[derive(Debug)]
struct ReadAgain {
    topic: String,
    partition: i32,
    from: i64,
    at: tokio::time::Instant,
}

/// A consumed record, copied out of librdkafka's buffer.
fn owned(m: &rdkafka::message::BorrowedMessage<'_>) -> Message {
    let headers = m
        .headers()
        .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default())).collect())
        .unwrap_or_default();
    Message {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
    }
}

/// A partition to be read from `target` on. Some brokers answer a fetch
/// that starts inside a record batch with the *next* batch (tansu 0.6 does),
/// which would silently skip the rest of that batch; when the first record
/// comes after `target`, the consumer seeks further back (`from`) and drops
/// what precedes `target`. Only when even the log's start lies beyond
/// `target` (records deleted by retention) is the gap accepted, loudly.
#[derive(Debug)]
struct Resume {
    topic: String,
    partition: i32,
    target: i64,
    from: i64,
    /// A record before `target` was read: the next ones are contiguous.
    found: bool,
    /// Reads again after the record at `target` did not come though the ones
    /// before it did (consumers with [`KafkaConsumer::contiguous`] only).
    tries: u32,
}

impl KafkaConsumer {
    /// The partitions now assigned, if a rebalance changed them since the last call.
    pub fn assignment_changed(&mut self) -> Option<Vec<(String, i32)>> {
        let mut a = self.assignment.lock().unwrap();
        if a.1 {
            a.1 = false;
            Some(a.0.clone())
        } else {
            None
        }
    }

    /// The next record to deliver.
    ///
    /// Cancellation-safe (services call it in `tokio::select!`): a record
    /// taken from librdkafka stays in `self.held` until it is delivered or
    /// dropped on purpose, a lookup of the committed offset or a wait before
    /// reading a hole again goes on where it was when the next call comes. A
    /// record taken and then lost to a dropped future is gone for good (the
    /// consumer's position has moved past it).
    pub async fn recv(&mut self) -> Result<Message, BusError> {
        loop {
            if let Some(r) = &mut self.reread {
                // A partition to read again from `from` once the wait is over.
                tokio::time::sleep_until(r.at).await;
                let r = self.reread.take().expect("a pending read-again");
                self.consumer.seek(&r.topic, r.partition, Offset::Offset(r.from), Duration::from_secs(10)).map_err(classify)?;
            }
            if self.held.as_ref().is_some_and(|h| !self.assignment.lock().unwrap().0.iter().any(|(t, p)| *t == h.m.topic && *p == h.m.partition)) {
                self.held = None; // a rebalance took the partition away meanwhile
            }
            if self.held.is_none() {
                let m = owned(&self.consumer.recv().await.map_err(classify)?);
                let first = {
                    let mut f = self.fresh.lock().unwrap();
                    let i = f.iter().position(|(t, p)| *t == m.topic && *p == m.partition);
                    i.map(|i| f.swap_remove(i)).is_some()
                };
                self.held = Some(Held { m, first, lookup: first.then_some(Lookup::Due) });
            }
            let h = self.held.as_mut().expect("a held record");
            let (topic, partition, offset) = (h.m.topic.as_str(), h.m.partition, h.m.offset);
            if let Some(lookup) = &mut h.lookup {
                // The first record since this partition was assigned: it must be the committed one.
                if let Lookup::Due = lookup {
                    let c = self.consumer.clone();
                    let (t, p) = (topic.to_string(), partition);
                    *lookup = Lookup::Asked(tokio::task::spawn_blocking(move || committed(&c, &t, p)));
                }
                let Lookup::Asked(task) = lookup else { unreachable!() };
                let got = task.await.unwrap_or_else(|e| Err(BusError::Transient(format!("the committed-offset lookup's thread failed: {e}"))));
                h.lookup = None;
                let committed = match got {
                    Ok(c) => c,
                    Err(e) => {
                        // Kept: the next call looks again.
                        h.lookup = Some(Lookup::Due);
                        return Err(e);
                    }
                };
                self.resume.retain(|r| !(r.topic == topic && r.partition == partition));
                if let Some(c) = committed.filter(|c| offset > *c) {
                    self.resume.push(Resume { topic: topic.to_string(), partition, target: c, from: c, found: false, tries: 0 });
                }
            }
            let first = h.first;
            let Some(i) = self.resume.iter().position(|r| r.topic == topic && r.partition == partition) else {
                if let Some(again) = Self::skipped(&mut self.gaps, (topic, partition, offset), first) {
                    self.reread = Some(again);
                    self.held = None;
                    continue;
                }
                return Ok(self.held.take().expect("a held record").m);
            };
            let r = &mut self.resume[i];
            if offset < r.target {
                r.found = true;
                self.held = None;
                continue; // before the resume point: not this consumer's to deliver
            }
            if let Some(g) = self.gaps.as_mut().filter(|_| offset > r.target && r.found && r.tries < crate::gaps::TRIES) {
                // The records before the resume point came, the one at it did not: on a
                // topic without holes, not readable yet (see `contiguous`). Again from `from`.
                let wait = crate::gaps::wait(r.tries);
                r.tries += 1;
                g.reread += 1;
                tracing::info!("bus: {topic}/{partition}: offsets {}..{offset} are missing after a resume; reading them again in {} ms", r.target, wait.as_millis());
                self.reread = Some(ReadAgain { topic: topic.to_string(), partition, from: r.from, at: tokio::time::Instant::now() + wait });
                self.held = None;
                continue;
            }
            if offset > r.target && !r.found {
                if r.from > 0 {
                    r.from = (r.target - 2 * (r.target - r.from).max(512)).max(0);
                    self.consumer.seek(topic, partition, Offset::Offset(r.from), Duration::from_secs(10)).map_err(classify)?;
                    self.held = None;
                    continue;
                }
                tracing::warn!(
                    "bus: {topic}/{partition}: records {}..{offset} are not on the broker any more (deleted before they were read); resuming at {offset}",
                    r.target
                );
            }
            self.resume.swap_remove(i);
            if let Some(g) = &mut self.gaps {
                g.restart(topic, partition, offset);
            }
            return Ok(self.held.take().expect("a held record").m);
        }
    }

    /// Checks every later record of each partition against the one before
    /// it: used on topics only Cepheid writes (no transactions, no
    /// compaction), whose offsets have no holes. A broker that answers a
    /// fetch with a batch *after* one not yet readable (tansu 0.6 raises a
    /// partition's high watermark before it stores the batch, so a fetch in
    /// between lists the batches after it but not the batch itself) would
    /// otherwise make the consumer pass over records silently: the missing
    /// offsets are read again, a few times with short waits, and only then
    /// passed over, with a warning.
    pub fn contiguous(&mut self) {
        self.gaps.get_or_insert_with(crate::gaps::Gaps::default);
    }

    /// Times a partition was read again for a hole (see [`KafkaConsumer::contiguous`]).
    pub fn holes_read_again(&self) -> u64 {
        self.gaps.as_ref().map_or(0, |g| g.reread)
    }

    /// `Some` when the record at `offset` comes after a hole: the record is
    /// dropped and the partition read again from the hole after a short wait.
    fn skipped(gaps: &mut Option<crate::gaps::Gaps>, (topic, partition, offset): (&str, i32, i64), first: bool) -> Option<ReadAgain> {
        let g = gaps.as_mut()?;
        if first {
            g.restart(topic, partition, offset);
            return None;
        }
        match g.check(topic, partition, offset) {
            crate::gaps::Check::Next => None,
            crate::gaps::Check::Again { expected } => {
                tracing::info!("bus: {topic}/{partition}: the client went back from offset {expected} to {offset}: records from it on come a second time");
                None
            }
            crate::gaps::Check::ReadAgain { from, wait } => {
                tracing::info!("bus: {topic}/{partition}: offsets {from}..{offset} are missing; reading them again in {} ms", wait.as_millis());
                Some(ReadAgain { topic: topic.to_string(), partition, from, at: tokio::time::Instant::now() + wait })
            }
            crate::gaps::Check::PassOver { from, tries } => {
                tracing::warn!(
                    "bus: {topic}/{partition}: offsets {from}..{offset} could not be read ({tries} attempts; the broker skipped them, or they were deleted); going on at {offset}"
                );
                None
            }
        }
    }

    /// The next record delivered from `partition` is the one at `offset` (or,
    /// if the log no longer holds it, the first one after it).
    pub async fn seek(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), BusError> {
        // Rare (after taking a partition); librdkafka answers quickly.
        self.consumer.seek(topic, partition, Offset::Offset(offset), Duration::from_secs(10)).map_err(classify)?;
        self.fresh.lock().unwrap().retain(|(t, p)| !(t == topic && *p == partition));
        if self.held.as_ref().is_some_and(|h| h.m.topic == topic && h.m.partition == partition) {
            self.held = None;
        }
        if self.reread.as_ref().is_some_and(|r| r.topic == topic && r.partition == partition) {
            self.reread = None;
        }
        self.resume.retain(|r| !(r.topic == topic && r.partition == partition));
        self.resume.push(Resume { topic: topic.to_string(), partition, target: offset, from: offset, found: false, tries: 0 });
        if let Some(g) = &mut self.gaps {
            g.forget(topic, partition);
        }
        Ok(())
    }

    /// Records of the assigned partitions after the group's committed offsets
    /// (librdkafka's statistics, refreshed every 5 s; None before the first).
    pub fn lag(&self) -> Option<u64> {
        let l = self.lag.load(std::sync::atomic::Ordering::Relaxed);
        (l >= 0).then_some(l as u64)
    }

    /// The partition's low and high watermarks (rare: when a partition is
    /// taken), awaited on a blocking thread: the runtime's threads (a shard's
    /// only one, by default) go on meanwhile, for as long as a slow broker takes.
    pub async fn bounds(&self, topic: &str, partition: i32) -> Result<(i64, i64), BusError> {
        let (c, topic) = (self.consumer.clone(), topic.to_string());
        match tokio::task::spawn_blocking(move || c.fetch_watermarks(&topic, partition, Duration::from_secs(10))).await {
            Ok(r) => r.map_err(classify),
            Err(e) => Err(BusError::Transient(format!("the watermark lookup's thread failed: {e}"))),
        }
    }

    pub fn commit(&self, topic: &str, partition: i32, next_offset: i64) -> Result<(), BusError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(next_offset)).map_err(classify)?;
        self.consumer.commit(&tpl, CommitMode::Async).map_err(classify)
    }
}
