//! Holes in a partition's offsets, for consumers of topics whose offsets have
//! none (see [`crate::Consumer::contiguous`]): what to do with each record.

use std::time::Duration;

/// Attempts to read a hole again before passing over it.
pub(crate) const TRIES: u32 = 4;

/// The wait before attempt `n` (0-based): 2, 8, 32, 128 ms (170 ms in all).
pub(crate) fn wait(n: u32) -> Duration {
    Duration::from_millis(2u64 << (2 * n))
}

/// Per partition read: the offset the next record must have.
#[derive(Debug, Default)]
pub(crate) struct Gaps {
    parts: Vec<Part>,
    /// Times a partition was read again for a hole (here or at a resume).
    pub(crate) reread: u64,
}

#[derive(Debug)]
struct Part {
    topic: String,
    partition: i32,
    next: i64,
    /// Attempts made so far to read the hole at `next`.
    tries: u32,
}

/// What to do with a record.
#[derive(Debug, PartialEq)]
pub(crate) enum Check {
    /// Deliver it: it follows the one before (or is the partition's first).
    Next,
    /// Drop it and read the partition again from `from` after `wait`: the
    /// records in between are missing.
    ReadAgain { from: i64, wait: Duration },
    /// Deliver it, passing over `from..` it: still missing after `tries` attempts.
    PassOver { from: i64, tries: u32 },
    /// Deliver it, though it comes again: the client went back by itself to
    /// before `expected` (records from it on are delivered a second time).
    Again { expected: i64 },
}

impl Gaps {
    fn part(&mut self, topic: &str, partition: i32) -> Option<&mut Part> {
        self.parts.iter_mut().find(|p| p.partition == partition && p.topic == topic)
    }

    /// The record at `offset` is delivered without a check (the first after an
    /// assignment or a seek); the next one must follow it.
    pub(crate) fn restart(&mut self, topic: &str, partition: i32, offset: i64) {
        match self.part(topic, partition) {
            Some(p) => {
                p.next = offset + 1;
                p.tries = 0;
            }
            None => self.parts.push(Part { topic: topic.to_string(), partition, next: offset + 1, tries: 0 }),
        }
    }

    /// The partition is read from elsewhere (a seek): its next record is not checked.
    pub(crate) fn forget(&mut self, topic: &str, partition: i32) {
        self.parts.retain(|p| !(p.partition == partition && p.topic == topic));
    }

    /// A record read at `offset`.
    pub(crate) fn check(&mut self, topic: &str, partition: i32, offset: i64) -> Check {
        let Some(p) = self.part(topic, partition) else {
            self.restart(topic, partition, offset);
            return Check::Next;
        };
        if offset > p.next {
            if p.tries < TRIES {
                let w = wait(p.tries);
                p.tries += 1;
                let from = p.next;
                self.reread += 1;
                return Check::ReadAgain { from, wait: w };
            }
            let (from, tries) = (p.next, p.tries);
            p.next = offset + 1;
            p.tries = 0;
            return Check::PassOver { from, tries };
        }
        let expected = p.next;
        p.next = offset + 1;
        p.tries = 0;
        if offset < expected {
            return Check::Again { expected };
        }
        Check::Next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hole_is_read_again_until_it_fills() {
        let mut g = Gaps::default();
        assert_eq!(g.check("t", 0, 10), Check::Next);
        assert_eq!(g.check("t", 0, 11), Check::Next);
        // 12 is missing: read again from it, waiting longer each time.
        assert_eq!(g.check("t", 0, 14), Check::ReadAgain { from: 12, wait: Duration::from_millis(2) });
        assert_eq!(g.check("t", 0, 14), Check::ReadAgain { from: 12, wait: Duration::from_millis(8) });
        // Now it is there: delivered, and the count starts again.
        assert_eq!(g.check("t", 0, 12), Check::Next);
        assert_eq!(g.check("t", 0, 13), Check::Next);
        assert_eq!(g.check("t", 0, 15), Check::ReadAgain { from: 14, wait: Duration::from_millis(2) });
        assert_eq!(g.reread, 3);
        // Other partitions and topics are counted apart.
        assert_eq!(g.check("t", 1, 100), Check::Next);
        assert_eq!(g.check("u", 0, 5), Check::Next);
        assert_eq!(g.check("t", 0, 14), Check::Next);
        // Going back is told too (records delivered a second time).
        assert_eq!(g.check("t", 0, 12), Check::Again { expected: 15 });
        assert_eq!(g.check("t", 0, 13), Check::Next);
    }

    #[test]
    fn a_hole_that_stays_is_passed_over_after_the_last_attempt() {
        let mut g = Gaps::default();
        g.restart("t", 3, 4);
        let waits: Vec<Check> = (0..TRIES).map(|_| g.check("t", 3, 9)).collect();
        assert_eq!(
            waits,
            [2, 8, 32, 128].map(|ms| Check::ReadAgain { from: 5, wait: Duration::from_millis(ms) })
        );
        assert_eq!(g.check("t", 3, 9), Check::PassOver { from: 5, tries: TRIES });
        assert_eq!(g.check("t", 3, 10), Check::Next);
    }

    #[test]
    fn after_a_seek_or_an_assignment_the_first_record_is_not_checked() {
        let mut g = Gaps::default();
        g.restart("t", 0, 50);
        g.forget("t", 0);
        assert_eq!(g.check("t", 0, 7), Check::Next);
        g.restart("t", 0, 90);
        assert_eq!(g.check("t", 0, 91), Check::Next);
    }
}
