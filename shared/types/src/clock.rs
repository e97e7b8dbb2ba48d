//! Time sources. Nothing in Cepheid reads the wall clock directly: it asks a
//! [`Clock`], which tests replace with a [`ManualClock`] they move by hand.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::Millis;

/// Where "now" comes from (processing time, `detected_at`, delivery times).
pub trait Clock: Send + Sync {
    fn now(&self) -> Millis;
}

/// The system clock (milliseconds since the epoch).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock tests set by hand; clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(t: Millis) -> Self {
        ManualClock(Arc::new(AtomicI64::new(t)))
    }
    pub fn set(&self, t: Millis) {
        self.0.store(t, Ordering::SeqCst)
    }
    pub fn advance(&self, d: Millis) {
        self.0.fetch_add(d, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}
