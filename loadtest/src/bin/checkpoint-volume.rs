//! What a matcher shard's checkpoints write, and how much of it was written
//! before: the example rules in key cells over a generated clickstream,
//! stepped as a shard steps them (events released 2 s behind the newest, keys
//! with a due deadline stepping too, cells without state dropped), with a
//! checkpoint every `--interval-ms` of event time writing every key that
//! stepped since the last one ([`KeyCell::encode`], as the shard does).
//!
//! Per checkpoint: keys written and bytes, of them keys written for the
//! first time. Over the run: how much of the rewritten keys' event text was
//! already in their previous write, and how much sat in rules whose state did
//! not change at all — the parts incremental cells (writing only what
//! changed) would leave out. No broker, Redis or actors: a deterministic
//! count, not a timing.
//! `cargo run --release -p cepheid-loadtest --bin checkpoint-volume -- --help`

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};

use cepheid_engine::cell::CellSnapshot;
use cepheid_engine::snapshot::KeySnapshot;
use cepheid_loadtest::clickstream::{generate, Params};
use cepheid_loadtest::examples::{Cells, ShardRules};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Events to generate (the sessions already running at the start add some).
    #[arg(long, default_value_t = 354_000)]
    events: usize,
    /// Events per second of event time (the cluster driver's `--rate`; 1 000 when it posts unpaced).
    #[arg(long, default_value_t = 5_900.0)]
    rate: f64,
    /// Checkpoint interval in event time (the shard's `checkpoint_interval_ms`).
    #[arg(long, default_value_t = 5_000)]
    interval_ms: i64,
    /// Events between releases.
    #[arg(long, default_value_t = 500)]
    release_every: usize,
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    #[arg(long, default_value_t = 5_000)]
    products: usize,
    /// Seconds of sessions already running before the first event (the cluster driver's `--warm-s`).
    #[arg(long, default_value_t = 900)]
    warm_s: i64,
}

#[derive(Default)]
struct Totals {
    writes: u64,
    bytes: u64,
    new_writes: u64,
    new_bytes: u64,
    /// Event text in rewritten keys, and of it: already in the key's previous
    /// write; in rules whose state did not change since then (but for its
    /// event counter).
    text: u64,
    text_written_before: u64,
    text_in_unchanged_rules: u64,
    rules_rewritten: u64,
    rules_unchanged: u64,
    /// Rewritten keys whose every rule state was unchanged.
    keys_unchanged: u64,
    keys_unchanged_bytes: u64,
    /// Bytes written per key signature.
    by_signature: std::collections::BTreeMap<String, u64>,
}

fn main() {
    let a = Args::parse();
    let shard = ShardRules::examples();
    let lines = generate(&Params { events: a.events, users: a.users, products: a.products, rate: a.rate, warm_ms: a.warm_s * 1000, ..Params::default() });
    let routed = shard.route(&lines);
    let mut c = Cells::default();
    // Per key: what its last checkpoint wrote.
    let mut written: HashMap<String, CellSnapshot> = HashMap::new();
    let mut dirty: HashSet<String> = HashSet::new();
    let mut tot = Totals::default();
    let (mut newest, mut next_ckpt, mut n_ckpt) = (i64::MIN, None::<i64>, 0);
    println!("checkpoint  keys written  of them new  bytes written  of them new keys'");
    for (i, (t, keys)) in routed.iter().enumerate() {
        newest = newest.max(*t);
        let next = *next_ckpt.get_or_insert(newest + a.interval_ms);
        for k in 0..keys.len() {
            c.pending.push(Reverse((*t, i, k)));
        }
        let last = i + 1 == routed.len();
        if i % a.release_every == a.release_every - 1 || last {
            for (key, dropped) in shard.release(newest - 2_000, &lines, &routed, &mut c) {
                if dropped {
                    dirty.remove(&key);
                    written.remove(&key);
                } else {
                    dirty.insert(key);
                }
            }
        }
        if newest >= next || last {
            next_ckpt = Some(next + a.interval_ms);
            n_ckpt += 1;
            let before = (tot.writes, tot.new_writes, tot.bytes, tot.new_bytes);
            for key in dirty.drain() {
                let cell = &c.cells[&key].0;
                let bytes = cell.encode().len() as u64;
                let snap = cell.snapshot();
                tot.writes += 1;
                tot.bytes += bytes;
                *tot.by_signature.entry(key.split('|').next().unwrap_or_default().to_string()).or_default() += bytes;
                if let Some(prev) = written.get(&key) {
                    compare(prev, &snap, bytes, &mut tot);
                } else {
                    tot.new_writes += 1;
                    tot.new_bytes += bytes;
                }
                written.insert(key, snap);
            }
            println!(
                "{n_ckpt:>10}  {:>12}  {:>11}  {:>13}  {:>17}",
                tot.writes - before.0,
                tot.new_writes - before.1,
                tot.bytes - before.2,
                tot.new_bytes - before.3
            );
        }
    }
    let pct = |x: u64, of: u64| 100.0 * x as f64 / of.max(1) as f64;
    println!(
        "{} events ({} with the sessions already running), {n_ckpt} checkpoints every {} ms of event time: {} key writes, {} bytes",
        a.events,
        lines.len(),
        a.interval_ms,
        tot.writes,
        tot.bytes
    );
    println!("  keys written for the first time: {} writes, {} bytes ({:.1} % of the bytes)", tot.new_writes, tot.new_bytes, pct(tot.new_bytes, tot.bytes));
    println!(
        "  rewritten keys: {} writes, {} of them ({} bytes) with every rule state unchanged; {} rule states, {} of them unchanged since the key's previous write ({:.1} %)",
        tot.writes - tot.new_writes,
        tot.keys_unchanged,
        tot.keys_unchanged_bytes,
        tot.rules_rewritten,
        tot.rules_unchanged,
        pct(tot.rules_unchanged, tot.rules_rewritten)
    );
    println!(
        "  their event text: {} bytes; already in the previous write {} ({:.1} %); in unchanged rule states {} ({:.1} %)",
        tot.text,
        tot.text_written_before,
        pct(tot.text_written_before, tot.text),
        tot.text_in_unchanged_rules,
        pct(tot.text_in_unchanged_rules, tot.text)
    );
    for (sig, b) in &tot.by_signature {
        println!("  bytes of keys by `{sig}`: {b} ({:.1} %)", pct(*b, tot.bytes));
    }
    println!("  key cells with state at the end: {}", c.cells.len());
}

/// Adds what `now` holds that `prev` (the key's previous write) held already.
fn compare(prev: &CellSnapshot, now: &CellSnapshot, bytes: u64, tot: &mut Totals) {
    let mut all_unchanged = prev.rules.len() == now.rules.len();
    for r in &now.rules {
        tot.rules_rewritten += 1;
        let old = prev.rules.iter().find(|x| x.id == r.id && x.version == r.version);
        let text: u64 = r.state.events.iter().map(|e| e.raw.len() as u64).sum();
        tot.text += text;
        // The event counter moves with every event offered, even one that changes nothing.
        let unchanged = old.is_some_and(|o| o.state.next_seq <= r.state.next_seq && KeySnapshot { next_seq: r.state.next_seq, ..o.state.clone() } == r.state);
        if unchanged {
            tot.rules_unchanged += 1;
            tot.text_in_unchanged_rules += text;
        } else {
            all_unchanged = false;
        }
        let ids: HashSet<_> = old.map(|o| o.state.events.iter().map(|e| e.id).collect()).unwrap_or_default();
        tot.text_written_before += r.state.events.iter().filter(|e| ids.contains(&e.id)).map(|e| e.raw.len() as u64).sum::<u64>();
    }
    if all_unchanged {
        tot.keys_unchanged += 1;
        tot.keys_unchanged_bytes += bytes;
    }
}
