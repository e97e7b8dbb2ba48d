//! Memory per open partial match and per key, and of the example rules over
//! the load generator's clickstream, in the engine and in key cells as matcher
//! shards hold them, measured with a counting allocator (heap bytes live, not
//! RSS).
//! `cargo run --release -p cepheid-loadtest --bin memory`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use cepheid_engine::engine::{Engine, EngineConfig, ManualClock, SourceConfig};
use cepheid_rules::parse_rule_json;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn engine() -> Engine {
    let cfg = EngineConfig { default_source: SourceConfig { time_field: "t".into(), out_of_orderness_ms: 0 }, ..Default::default() };
    let mut e = Engine::new(cfg, Arc::new(ManualClock::new(0)));
    let r = r#"{"id":"wait","version":1,"key_by":"k","pattern":[{"name":"a","where":"kind = 'a'"},{"name":"b","where":"kind = 'b'"}],"within":"1d"}"#;
    e.upsert_rule(&parse_rule_json(r).unwrap()).unwrap();
    e
}

fn measure(n: usize, line: impl Fn(usize) -> String) -> (f64, usize) {
    let mut e = engine();
    let mut out = Vec::new();
    // Warm up the engine's own structures.
    let w = e.decode("s", &line(0)).unwrap();
    e.push("s", w, &mut out);
    let before = LIVE.load(Ordering::Relaxed);
    for i in 1..=n {
        let ev = e.decode("s", &line(i)).unwrap();
        e.push("s", ev, &mut out);
    }
    let after = LIVE.load(Ordering::Relaxed);
    let keys = e.state_size().1;
    ((after - before) as f64 / n as f64, keys)
}

fn main() {
    let n = 100_000;
    // Each event is ~60 bytes of JSON text, stored once per event the state holds.
    let (per_partial, _) = measure(n, |i| format!(r#"{{"t":{i},"k":1,"kind":"a"}}"#));
    let (per_key, keys) = measure(n, |i| format!(r#"{{"t":{i},"k":{i},"kind":"a"}}"#));
    let (per_idle, idle_keys) = measure(n, |i| format!(r#"{{"t":{i},"k":{i},"kind":"x"}}"#));
    println!("memory: {per_partial:.0} bytes per open partial match (one key, {n} partial matches, event text included)");
    println!("memory: {per_key:.0} bytes per key holding one partial match ({keys} keys)");
    println!("memory: {per_idle:.1} bytes per key that holds no partial match ({idle_keys} keys kept)");
    let (total, partials, keys, per_event) = example_rules(200_000);
    println!(
        "memory: the example rules over a 200000-event clickstream: {:.1} MB live ({:.0} bytes per event; {partials} partial matches over {keys} rule keys, {:.0} bytes each); one decoded event alone {per_event:.0} bytes",
        total as f64 / 1e6,
        total as f64 / 200_000.0,
        total as f64 / partials as f64
    );
    let (total, partials, keys) = key_cells(200_000);
    println!(
        "memory: the same in key cells, as matcher shards hold them (an event decoded once per key it goes to; no actors): {:.1} MB live ({:.0} bytes per event; {partials} partial matches over {keys} keys with state, {:.0} bytes per key)",
        total as f64 / 1e6,
        total as f64 / 200_000.0,
        total as f64 / keys.max(1) as f64
    );
}

/// [`example_rules`] the way matcher shards run them: per signature
/// (`key_by`), one key cell per key; each event decoded once for every key it
/// goes to, held until the watermark (2 s behind the newest event) passes it,
/// then released to its key's cell a thousand events at a time, keys with a
/// deadline due stepping too; cells without state dropped. The live heap
/// after `n` events, and the partial matches and keys with state then.
fn key_cells(n: usize) -> (isize, usize, usize) {
    use std::cmp::Reverse;
    let shard = cepheid_loadtest::examples::ShardRules::examples();
    let params = cepheid_loadtest::clickstream::Params { events: n, users: 20_000, products: 5_000, ..Default::default() };
    let lines = cepheid_loadtest::clickstream::generate(&params);
    // Per event, the keys it goes to (worked out before measuring: the router's part).
    let keyed = shard.route(&lines);
    let before = LIVE.load(Ordering::Relaxed);
    let mut c = cepheid_loadtest::examples::Cells::default();
    let mut newest = i64::MIN;
    for (i, (t, keys)) in keyed.iter().enumerate() {
        newest = newest.max(*t);
        for k in 0..keys.len() {
            c.pending.push(Reverse((*t, i, k)));
        }
        if i % 1000 == 999 {
            shard.release(newest - 2_000, &lines, &keyed, &mut c);
        }
    }
    shard.release(newest - 2_000, &lines, &keyed, &mut c);
    // What is still waiting for the watermark is the shard's reorder buffer, not the cells'.
    c.pending = Default::default();
    let total = LIVE.load(Ordering::Relaxed) - before;
    let partials = c.cells.values().map(|(c, _)| c.partial_count()).sum();
    (total, partials, c.cells.len())
}

/// The rules of `rules/examples` over the load generator's clickstream (as
/// the `embedded` benchmark runs them): the live heap after `n` events, the
/// partial matches and keys then, and what one decoded event holds alone.
fn example_rules(n: usize) -> (isize, usize, usize, f64) {
    let mut e = Engine::new(EngineConfig::default(), Arc::new(ManualClock::new(0)));
    for spec in cepheid_loadtest::examples::rules() {
        e.upsert_rule(&spec).expect("an example rule compiles");
    }
    let params = cepheid_loadtest::clickstream::Params { events: n, users: 20_000, products: 5_000, ..Default::default() };
    let lines = cepheid_loadtest::clickstream::generate(&params);
    let before = LIVE.load(Ordering::Relaxed);
    let alone: Vec<_> = lines[..1000].iter().map(|l| e.decode_owned("clickstream", l.clone()).expect("a generated event")).collect();
    let per_event = (LIVE.load(Ordering::Relaxed) - before) as f64 / alone.len() as f64;
    drop(alone);
    let mut out = Vec::new();
    let before = LIVE.load(Ordering::Relaxed);
    for l in lines.iter() {
        let ev = e.decode_owned("clickstream", l.clone()).expect("a generated event");
        e.push("clickstream", ev, &mut out);
        out.clear();
    }
    let total = LIVE.load(Ordering::Relaxed) - before;
    let (partials, keys) = e.state_size();
    (total, partials, keys, per_event)
}
