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
    use cepheid_engine::cell::{KeyCell, Released};
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashMap};
    let shard = cepheid_loadtest::examples::ShardRules::examples();
    let book = &shard.book;
    let params = cepheid_loadtest::clickstream::Params { events: n, users: 20_000, products: 5_000, ..Default::default() };
    let lines = cepheid_loadtest::clickstream::generate(&params);
    // Per event, the keys it goes to (worked out before measuring: the router's part).
    let keyed: Vec<(i64, Vec<String>)> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a generated event");
            let keys = shard.keys_of(&v).into_iter().map(|(_, k)| k).collect();
            (v["eventTime"].as_i64().expect("an event time"), keys)
        })
        .collect();
    let before = LIVE.load(Ordering::Relaxed);
    let mut cells: HashMap<String, (KeyCell, Option<i64>)> = HashMap::new();
    let mut pending: BinaryHeap<Reverse<(i64, usize, usize)>> = BinaryHeap::new();
    let mut newest = i64::MIN;
    let release = |w: i64, pending: &mut BinaryHeap<Reverse<(i64, usize, usize)>>, cells: &mut HashMap<String, (KeyCell, Option<i64>)>| {
        let mut batches: HashMap<String, Vec<Released>> = HashMap::new();
        while pending.peek().is_some_and(|Reverse((t, _, _))| *t < w) {
            let Reverse((t, i, k)) = pending.pop().expect("peeked");
            let key = keyed[i].1[k].clone();
            let event = book.decode("clickstream", &lines[i], t).expect("a generated event");
            batches.entry(key).or_default().push(Released { source: "clickstream".into(), event });
        }
        for (k, (_, d)) in cells.iter() {
            if d.is_some_and(|d| d <= w) && !batches.contains_key(k) {
                batches.insert(k.clone(), Vec::new());
            }
        }
        for (key, evs) in batches {
            let sig = key.split('|').next().unwrap_or_default();
            let Some(rules) = book.signature(sig) else { continue };
            let (cell, deadline) = cells.entry(key.clone()).or_default();
            let out = cell.step(rules, &evs, Some(w), w);
            *deadline = out.deadline;
            if out.idle {
                cells.remove(&key);
            }
        }
    };
    for (i, (t, keys)) in keyed.iter().enumerate() {
        newest = newest.max(*t);
        for k in 0..keys.len() {
            pending.push(Reverse((*t, i, k)));
        }
        if i % 1000 == 999 {
            release(newest - 2_000, &mut pending, &mut cells);
        }
    }
    release(newest - 2_000, &mut pending, &mut cells);
    // What is still waiting for the watermark is the shard's reorder buffer, not the cells'.
    drop(pending);
    let total = LIVE.load(Ordering::Relaxed) - before;
    let partials = cells.values().map(|(c, _)| c.partial_count()).sum();
    (total, partials, cells.len())
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
