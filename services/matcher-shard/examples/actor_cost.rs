//! What one key's actor costs before it holds any state: resident memory
//! and start time of an idle ractor actor (its mailboxes and task), the floor
//! under the shard's memory per key with live state (BENCHMARKS.md).
//! `cargo run --release -p cepheid-matcher-shard --example actor_cost`

use ractor::{Actor, ActorProcessingErr, ActorRef};
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
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
    let r0 = rss();
    let t = std::time::Instant::now();
    let mut v = Vec::new();
    for _ in 0..n { v.push(Actor::spawn(None, A, ()).await.unwrap().0); }
    let dt = t.elapsed();
    let r1 = rss();
    let t = std::time::Instant::now();
    for a in &v { let _ = a.send_message(1); }
    tokio::task::yield_now().await;
    let dt2 = t.elapsed();
    println!(
        "{n} idle actors: started in {dt:?} ({:?} each), {} bytes resident each; a message to each: {:?} per send",
        dt / n,
        (r1 - r0) / n as u64,
        dt2 / n
    );
}
