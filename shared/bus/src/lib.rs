//! The bus between Cepheid's services: topics of partitioned, ordered,
//! acknowledged records, consumed by groups with explicit commits.
//!
//! Two implementations behind one [`Bus`]: Kafka (through `rdkafka`; the only
//! crate of the project that links it) and an in-memory bus, which is not a
//! test double but what the embedded, single-process mode runs on. Partitions
//! are chosen by [`partition_for`] (jump consistent hashing), so raising the
//! partition count moves few keys.

pub mod frame;
mod gaps;
mod kafka;
mod memory;

use std::sync::Arc;

pub use kafka::KafkaConfig;

/// One record as consumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The broker is unreachable or failing: retry with backoff.
    #[error("kafka: {0}")]
    Transient(String),
    /// A request the broker refuses (unknown topic, bad config): do not retry.
    #[error("kafka: {0}")]
    Refused(String),
    #[error("topic `{0}` does not exist")]
    UnknownTopic(String),
}

impl BusError {
    pub fn is_transient(&self) -> bool {
        matches!(self, BusError::Transient(_))
    }
}

/// Partition of a key: jump consistent hash (Lamping & Veach) of its xxh3
/// hash. Going from n to n + 1 partitions moves about 1/(n + 1) of the keys.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    let mut k = xxhash_rust::xxh3::xxh3_64(key);
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < partitions as i64 {
        b = j;
        k = k.wrapping_mul(2862933555777941757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((k >> 33) + 1) as f64)) as i64;
    }
    b as i32
}

/// The acknowledgement of an enqueued record: (partition, offset).
pub type Delivery = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(i32, i64), BusError>> + Send>>;

/// Kafka or memory.
#[derive(Clone)]
pub enum Bus {
    Memory(Arc<memory::MemoryBus>),
    Kafka(Arc<kafka::KafkaBus>),
}

/// A consumer group member.
pub enum Consumer {
    Memory(memory::MemoryConsumer),
    Kafka(kafka::KafkaConsumer),
}

impl Bus {
    pub fn memory() -> Bus {
        Bus::Memory(Arc::new(memory::MemoryBus::default()))
    }

    pub fn kafka(cfg: &KafkaConfig) -> Result<Bus, BusError> {
        Ok(Bus::Kafka(Arc::new(kafka::KafkaBus::new(cfg)?)))
    }

    /// Creates a topic if it does not exist (idempotent).
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), BusError> {
        match self {
            Bus::Memory(m) => {
                m.create_topic(topic, partitions);
                Ok(())
            }
            Bus::Kafka(k) => k.create_topic(topic, partitions).await,
        }
    }

    /// The partition count of a topic.
    pub async fn partitions(&self, topic: &str) -> Result<i32, BusError> {
        match self {
            Bus::Memory(m) => m.partitions(topic),
            Bus::Kafka(k) => k.partitions(topic).await,
        }
    }

    /// The partition a record goes to: the one given, else the key's
    /// [`partition_for`], else 0.
    async fn partition_of(&self, topic: &str, partition: Option<i32>, key: Option<&[u8]>) -> Result<i32, BusError> {
        Ok(match (partition, key) {
            (Some(p), _) => p,
            (None, Some(k)) => partition_for(k, self.partitions(topic).await?),
            (None, None) => 0,
        })
    }

    /// Sends a record and waits for the acknowledgement; returns (partition, offset).
    /// Without a partition, the key's [`partition_for`] is used (partition 0 without a key).
    pub async fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(i32, i64), BusError> {
        let partition = self.partition_of(topic, partition, key).await?;
        match self {
            Bus::Memory(m) => m.send(topic, partition, key, payload, headers),
            Bus::Kafka(k) => k.send(topic, partition, key, payload, headers).await,
        }
    }

    /// Hands a record to the bus at once and returns the wait for its
    /// acknowledgement: records enqueued one after another keep that order in
    /// their partition, while their acknowledgements are awaited together.
    /// A full producer queue is a transient error: await what is in flight,
    /// then enqueue again.
    pub async fn enqueue(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<Delivery, BusError> {
        let partition = self.partition_of(topic, partition, key).await?;
        match self {
            Bus::Memory(m) => {
                let r = m.send(topic, partition, key, payload, headers);
                Ok(Box::pin(async move { r }))
            }
            Bus::Kafka(k) => k.enqueue(topic, partition, key, payload, headers),
        }
    }

    /// Joins consumer group `group` on `topics`; consumption starts at the
    /// group's committed offsets (the beginning when none).
    pub fn subscribe(&self, group: &str, topics: &[&str]) -> Result<Consumer, BusError> {
        match self {
            Bus::Memory(m) => Ok(Consumer::Memory(m.subscribe(group, topics)?)),
            Bus::Kafka(k) => Ok(Consumer::Kafka(k.subscribe(group, topics)?)),
        }
    }
}

impl Consumer {
    /// The next record of an assigned partition.
    ///
    /// Cancellation-safe, on both buses: a call dropped before it returns
    /// (another `tokio::select!` branch was ready first) loses no record; the
    /// next call delivers it.
    pub async fn recv(&mut self) -> Result<Message, BusError> {
        match self {
            Consumer::Memory(m) => m.recv().await,
            Consumer::Kafka(k) => k.recv().await,
        }
    }

    /// Treats a hole in a partition's offsets as records the broker has not
    /// made readable yet: they are read again (a few times, with short
    /// waits) before the consumer passes over them with a warning. For
    /// topics only Cepheid writes (no transactions, no compaction: no holes
    /// on Kafka); not for raw topics, whose transaction markers leave holes.
    /// The memory bus has no holes.
    pub fn contiguous(mut self) -> Consumer {
        if let Consumer::Kafka(k) = &mut self {
            k.contiguous();
        }
        self
    }

    /// Times a partition was read again because of a hole in its offsets
    /// (see [`Consumer::contiguous`]; 0 on the memory bus).
    pub fn holes_read_again(&self) -> u64 {
        match self {
            Consumer::Memory(_) => 0,
            Consumer::Kafka(k) => k.holes_read_again(),
        }
    }

    /// The partitions assigned to this member, when a rebalance changed them
    /// since the last call (the first call after joining reports the first
    /// assignment once it is known). A member that kept state for a partition
    /// no longer listed must drop it: another member now reads it.
    pub fn assignment_changed(&mut self) -> Option<Vec<(String, i32)>> {
        match self {
            Consumer::Memory(m) => m.assignment_changed(),
            Consumer::Kafka(k) => k.assignment_changed(),
        }
    }

    /// Reads partition `partition` of `topic` (assigned to this member) from
    /// `offset` on: records after it are delivered again.
    pub async fn seek(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), BusError> {
        match self {
            Consumer::Memory(m) => {
                m.seek(topic, partition, offset);
                Ok(())
            }
            Consumer::Kafka(k) => k.seek(topic, partition, offset).await,
        }
    }

    /// How far behind this member is: records of its assigned partitions not
    /// read yet (memory), or after the group's committed offsets (Kafka, from
    /// librdkafka's statistics every 5 s; None until the first report).
    pub fn lag(&self) -> Option<u64> {
        match self {
            Consumer::Memory(m) => Some(m.lag()),
            Consumer::Kafka(k) => k.lag(),
        }
    }

    /// The offsets partition `partition` of `topic` holds records between:
    /// its first record's and the next one to be written (Kafka's low and high
    /// watermarks; a round trip to the broker).
    pub async fn bounds(&self, topic: &str, partition: i32) -> Result<(i64, i64), BusError> {
        match self {
            Consumer::Memory(m) => Ok(m.bounds(topic, partition)),
            Consumer::Kafka(k) => k.bounds(topic, partition).await,
        }
    }

    /// Commits: the group resumes partition `partition` of `topic` at `next_offset`.
    pub fn commit(&self, topic: &str, partition: i32, next_offset: i64) -> Result<(), BusError> {
        match self {
            Consumer::Memory(m) => {
                m.commit(topic, partition, next_offset);
                Ok(())
            }
            Consumer::Kafka(k) => k.commit(topic, partition, next_offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_hash_moves_few_keys() {
        let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let moved = keys.iter().filter(|k| partition_for(k.as_bytes(), 8) != partition_for(k.as_bytes(), 9)).count();
        // Ideal: 1/9 of the keys.
        assert!(moved > 800 && moved < 1_450, "{moved} keys moved");
        let mut counts = [0; 8];
        for k in &keys {
            counts[partition_for(k.as_bytes(), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| *c > 1_000 && *c < 1_500), "{counts:?}");
    }
}
