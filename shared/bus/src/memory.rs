//! The in-memory bus: partition logs in memory, consumer groups with
//! committed offsets. A group's partitions are split round-robin over its
//! live members and split again whenever a member joins or leaves (a
//! rebalance): a partition a member newly gets is read from the group's
//! committed offset, as Kafka does; the member learns of the change through
//! [`MemoryConsumer::assignment_changed`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::{BusError, Message};

#[derive(Default)]
struct Group {
    generation: u64,
    members: Vec<u64>,
}

#[derive(Default)]
pub struct MemoryBus {
    topics: Mutex<HashMap<String, Vec<Vec<Message>>>>,
    committed: Mutex<HashMap<(String, String, i32), i64>>,
    groups: Mutex<HashMap<String, Group>>,
    next_member: Mutex<u64>,
    appended: Arc<Notify>,
}

impl MemoryBus {
    /// Creates a topic; an existing topic is left as it is (as Kafka's
    /// CreateTopics does: its partition count never changes here).
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let mut t = self.topics.lock().unwrap();
        t.entry(topic.to_string()).or_insert_with(|| (0..partitions.max(1)).map(|_| Vec::new()).collect());
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
        {
            let t = self.topics.lock().unwrap();
            // Check every topic before joining the group: a failed subscribe leaves no member behind.
            for topic in topics {
                if !t.contains_key(*topic) {
                    return Err(BusError::UnknownTopic(topic.to_string()));
                }
            }
        }
        let id = {
            let mut next = self.next_member.lock().unwrap();
            *next += 1;
            *next
        };
        {
            let mut g = self.groups.lock().unwrap();
            let grp = g.entry(group.to_string()).or_default();
            grp.members.push(id);
            grp.generation += 1;
        }
        self.appended.notify_waiters();
        Ok(MemoryConsumer {
            bus: self.clone(),
            group: group.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            generation: 0,
            positions: Vec::new(),
            next: 0,
            id,
            changed: None,
        })
    }
}

pub struct MemoryConsumer {
    bus: Arc<MemoryBus>,
    group: String,
    topics: Vec<String>,
    /// The group generation `positions` was computed for.
    generation: u64,
    /// (topic, partition, next offset to read)
    positions: Vec<(String, i32, i64)>,
    next: usize,
    id: u64,
    /// A new assignment the owner has not been told of yet.
    changed: Option<Vec<(String, i32)>>,
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        if let Some(g) = self.bus.groups.lock().unwrap().get_mut(&self.group) {
            g.members.retain(|m| *m != self.id);
            g.generation += 1;
        }
        self.bus.appended.notify_waiters();
    }
}

impl MemoryConsumer {
    /// Recomputes this member's partitions when the group changed.
    fn sync(&mut self) {
        let (generation, index, n) = {
            let g = self.bus.groups.lock().unwrap();
            let grp = &g[&self.group];
            let index = grp.members.iter().position(|m| *m == self.id).unwrap_or(0);
            (grp.generation, index, grp.members.len().max(1))
        };
        if generation == self.generation {
            return;
        }
        let first = self.generation == 0;
        self.generation = generation;
        let t = self.bus.topics.lock().unwrap();
        let committed = self.bus.committed.lock().unwrap();
        let mut positions = Vec::new();
        let mut i = 0usize;
        for topic in &self.topics {
            for p in 0..t[topic].len() as i32 {
                if i % n == index {
                    let kept = self.positions.iter().find(|(tp, pp, _)| tp == topic && *pp == p).map(|x| x.2);
                    let start = kept.unwrap_or_else(|| committed.get(&(self.group.clone(), topic.clone(), p)).copied().unwrap_or(0));
                    positions.push((topic.clone(), p, start));
                }
                i += 1;
            }
        }
        let mine: Vec<(String, i32)> = positions.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
        let before: Vec<(String, i32)> = self.positions.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
        if mine != before || first {
            self.changed = Some(mine);
        }
        self.positions = positions;
        self.next = 0;
    }

    /// The partitions now assigned, if they changed since the last call.
    pub fn assignment_changed(&mut self) -> Option<Vec<(String, i32)>> {
        self.sync();
        self.changed.take()
    }

    /// Records of the assigned partitions not read yet.
    pub fn lag(&self) -> u64 {
        let t = self.bus.topics.lock().unwrap();
        self.positions
            .iter()
            .map(|(topic, p, pos)| t.get(topic.as_str()).and_then(|l| l.get(*p as usize)).map_or(0, |log| (log.len() as i64 - pos).max(0) as u64))
            .sum()
    }

    pub async fn recv(&mut self) -> Result<Message, BusError> {
        let bus = self.bus.clone();
        loop {
            let notified = bus.appended.notified();
            self.sync();
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

    pub fn seek(&mut self, topic: &str, partition: i32, offset: i64) {
        for (t, p, pos) in &mut self.positions {
            if t == topic && *p == partition {
                *pos = offset.max(0);
            }
        }
    }

    /// (first offset, next offset) of a partition's log; (0, 0) when there is none.
    pub fn bounds(&self, topic: &str, partition: i32) -> (i64, i64) {
        let t = self.bus.topics.lock().unwrap();
        (0, t.get(topic).and_then(|l| l.get(partition as usize)).map_or(0, |log| log.len() as i64))
    }

    pub fn commit(&self, topic: &str, partition: i32, next_offset: i64) {
        self.bus.committed.lock().unwrap().insert((self.group.clone(), topic.to_string(), partition), next_offset);
    }
}
