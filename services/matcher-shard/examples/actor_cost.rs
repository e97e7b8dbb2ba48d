//! What one key's actor costs before it holds any state: resident memory,
//! heap allocations and start time of an idle ractor actor (its mailboxes and
//! task), the floor under the shard's memory per key with live state
//! (BENCHMARKS.md).
//! `cargo run --release -p cepheid-matcher-shard --example actor_cost`

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ractor::{Actor, ActorProcessingErr, ActorRef};

/// mimalloc, as the shard runs, counting what is allocated while `COUNTING`.
struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(l.size() as u64, Ordering::Relaxed);
        }
        unsafe { mimalloc::MiMalloc.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

struct A;
impl Actor for A {
    type Msg = u32;
    type State = Vec<u8>;
    type Arguments = ();
    async fn pre_start(&self, _me: ActorRef<u32>, _: ()) -> Result<Vec<u8>, ActorProcessingErr> { Ok(Vec::new()) }
    async fn handle(&self, _me: ActorRef<u32>, m: u32, s: &mut Vec<u8>) -> Result<(), ActorProcessingErr> { s.push(m as u8); Ok(()) }
}
/// Resident bytes of this process.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = 30_000;
    let mut v = Vec::with_capacity(n);
    let r0 = rss();
    let t = std::time::Instant::now();
    COUNTING.store(true, Ordering::SeqCst);
    for _ in 0..n { v.push(Actor::spawn(None, A, ()).await.unwrap().0); }
    COUNTING.store(false, Ordering::SeqCst);
    let dt = t.elapsed();
    let r1 = rss();
    let t = std::time::Instant::now();
    for a in &v { let _ = a.send_message(1); }
    tokio::task::yield_now().await;
    let dt2 = t.elapsed();
    println!(
        "{n} idle actors: started in {dt:?} ({:?} each), {} bytes resident each; a message to each: {:?} per send",
        dt / n as u32,
        (r1 - r0) / n as u64,
        dt2 / n as u32
    );
    // A tokio unbounded channel allocates its first block of 32 slots when it
    // is made; ractor makes two per actor (supervision events, and messages:
    // a `BoxedMessage` in ractor's internal enum, one word more).
    let block = |slot: usize| 32 * slot + 32;
    println!(
        "heap per actor: {:.1} allocations, {} bytes; of them the two mailboxes' first blocks about {} (supervision, {} bytes a slot) + {} (messages)",
        ALLOCS.load(Ordering::SeqCst) as f64 / n as f64,
        BYTES.load(Ordering::SeqCst) / n as u64,
        block(std::mem::size_of::<ractor::SupervisionEvent>()),
        std::mem::size_of::<ractor::SupervisionEvent>(),
        block(std::mem::size_of::<ractor::message::BoxedMessage>() + 8)
    );
}
