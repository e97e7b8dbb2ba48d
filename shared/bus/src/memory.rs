//! The in-memory bus: partition logs in memory, consumer groups with
//! committed offsets. Members of one group split the partitions round-robin
//! when they join (no rebalancing later); a member leaves when dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::{BusError, Message};

#[derive(Default)]
pub struct MemoryBus {
    topics: Mutex<HashMap<String, Vec<Vec<Message>>>>,
    committed: Mutex<HashMap<(String, String, i32), i64>>,
    /// Live members per group.
    members: Mutex<HashMap<String, Vec<u64>>>,
    next_member: Mutex<u64>,
    appended: Arc<Notify>,
}

impl MemoryBus {
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let mut t = self.topics.lock().unwrap();
        let logs = t.entry(topic.to_string()).or_default();
        while logs.len() < partitions.max(1) as usize {
            logs.push(Vec::new());
        }
    }

    pub fn partitions(&self, topic: &str) -> Result<i32, BusError> {
        self.topics.lock().unwrap().get(topic).map(|l| l.len() as i32).ok_or_else(|| BusError::UnknownTopic(topic.into()))
    }

    pub fn send(&self, topic: &str, partition: i32, key: Option<&[u8]>, payload: &[u8], headers: &[(&str, &[u8])]) -> Result<(i32, i64), BusError> {
        let mut t = self.topics.lock().unwrap();
        let logs = t.get_mut(topic).ok_or_else(|| BusError::UnknownTopic(topic.into()))?;
        let log = logs.get_mut(partition as usize).ok_or_else(|| BusError::Refused(format!("{topic} has no partition {partition}")))?;
        let offset = log.len() as i64;
        log.push(Message {
            topic: topic.to_string(),
            partition,
            offset,
            key: key.map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect(),
        });
        drop(t);
        self.appended.notify_waiters();
        Ok((partition, offset))
    }

    pub fn subscribe(self: &Arc<Self>, group: &str, topics: &[&str]) -> Result<MemoryConsumer, BusError> {
        let t = self.topics.lock().unwrap();
        // Check every topic before joining the group: a failed subscribe leaves no member behind.
        for topic in topics {
            if !t.contains_key(*topic) {
                return Err(BusError::UnknownTopic(topic.to_string()));
            }
        }
        let (id, member) = {
            let mut next = self.next_member.lock().unwrap();
            *next += 1;
            let mut m = self.members.lock().unwrap();
            let live = m.entry(group.to_string()).or_default();
            live.push(*next);
            (*next, live.len() - 1)
        };
        let mut positions = Vec::new();
        let committed = self.committed.lock().unwrap();
        let mut i = 0usize;
        for topic in topics {
            let logs = &t[*topic];
            for p in 0..logs.len() as i32 {
                // Round-robin over members as they join; the first member takes all until others join.
                if member == 0 || i % (member + 1) == member {
                    let start = committed.get(&(group.to_string(), topic.to_string(), p)).copied().unwrap_or(0);
                    positions.push((topic.to_string(), p, start));
                }
                i += 1;
            }
        }
        drop((t, committed));
        Ok(MemoryConsumer { bus: self.clone(), group: group.to_string(), positions, next: 0, id })
    }
}

pub struct MemoryConsumer {
    bus: Arc<MemoryBus>,
    group: String,
    /// (topic, partition, next offset to read)
    positions: Vec<(String, i32, i64)>,
    next: usize,
    id: u64,
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        if let Some(live) = self.bus.members.lock().unwrap().get_mut(&self.group) {
            live.retain(|m| *m != self.id);
        }
    }
}

impl MemoryConsumer {
    pub async fn recv(&mut self) -> Result<Message, BusError> {
        loop {
            let notified = self.bus.appended.notified();
            {
                let t = self.bus.topics.lock().unwrap();
                for k in 0..self.positions.len() {
                    let i = (self.next + k) % self.positions.len();
                    let (topic, p, pos) = &mut self.positions[i];
                    if let Some(m) = t.get(topic.as_str()).and_then(|l| l.get(*p as usize)).and_then(|log| log.get(*pos as usize)) {
                        *pos += 1;
                        self.next = i + 1;
                        return Ok(m.clone());
                    }
                }
            }
            notified.await;
        }
    }

    pub fn commit(&self, topic: &str, partition: i32, next_offset: i64) {
        self.bus.committed.lock().unwrap().insert((self.group.clone(), topic.to_string(), partition), next_offset);
    }
}
