//! Load driver for the local cluster (`scripts/local-cluster.sh start`):
//! posts a generated clickstream to ingest in batches (at `--rate` events/s,
//! or as fast as ingest acknowledges), and reports
//! - sustained events/s through the whole cluster: from the first post until
//!   the shards consumed every keyed record the router published;
//! - event-to-alert latency, p50/p95/p99: from ingest's acknowledgement of the
//!   batch holding a match's last event until the alert line appears in the
//!   notifier's file (polled every 2 ms);
//! - the same beyond the lateness: from the acknowledgement of the first batch
//!   that takes the event time seen past the match's last event plus the
//!   configured out-of-orderness bound (before that no watermark can decide
//!   the match) until the alert line appears: what the cluster adds;
//! - of that, the part after the shard decided the match (its `detected_at`)
//!   until the alert line appears (matches topic, notifier, file);
//! - resident memory of every service process.
//!
//! `cargo run --release -p cepheid-loadtest --bin cluster -- --help`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cepheid_loadtest::clickstream::{generate, Params};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    ingest: String,
    #[arg(long, default_value = "http://127.0.0.1:9101")]
    router: String,
    #[arg(long, default_value = "http://127.0.0.1:9103,http://127.0.0.1:9104")]
    shards: String,
    /// The notifier's probe (its duplicate count tells matches lost; not required).
    #[arg(long, default_value = "http://127.0.0.1:9102")]
    notifier: String,
    #[arg(long, default_value = ".local-cluster/alerts.jsonl")]
    alerts: PathBuf,
    /// Where the services' pid files are (for memory figures).
    #[arg(long, default_value = ".local-cluster")]
    pids: PathBuf,
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    #[arg(long, default_value_t = 5_000)]
    products: usize,
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Target events/s (0: as fast as ingest acknowledges).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds of event time during which the generator's sessions already
    /// run before the first event posted (0: none): then event time advances
    /// at the paced rate from the first event to the last, as on a site that
    /// was busy before the measurement began, instead of thinning out as the
    /// run's sessions finish.
    #[arg(long, default_value_t = 0)]
    warm_s: i64,
    /// The end of a run, in ms of event time before the last event posted:
    /// matches decided there wait for what moves the watermark once the input
    /// stops, so `beyond_lateness_steady_ms` leaves them out.
    #[arg(long, default_value_t = 1_000)]
    cooldown_ms: i64,
    /// Posts in flight at once. With 1 each post waits for the previous one's
    /// acknowledgement; paced runs with small batches (many posts a second, as
    /// many clients send) need more.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The cluster's out-of-orderness bound (the default source's), ms.
    #[arg(long, default_value_t = 2_000)]
    lateness_ms: i64,
    /// The rules the cluster runs (to tell which matches end in an absence).
    #[arg(long, default_value = "rules/examples")]
    rules: PathBuf,
    /// Write each measured alert (ms since the first post when it was seen,
    /// its beyond-lateness latency, its rule, when the shard decided it in ms
    /// since the first post, the event time that decides it) to this file, as JSON lines.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Also append a JSON line with the results to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Send each post under an `Idempotency-Key` of its own (ingest then
    /// remembers it in Redis: what keyed posts cost).
    #[arg(long)]
    keys: bool,
}

async fn scrape(http: &reqwest::Client, url: &str, metric: &str) -> anyhow::Result<f64> {
    let text = http.get(format!("{url}/metrics")).send().await?.text().await?;
    Ok(text
        .lines()
        .find(|l| l.starts_with(metric) && l[metric.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

/// The largest value of a metric over its label sets (0 when the service or
/// the metric is not there): per-target counters of the notifier count each
/// match once per target.
async fn scrape_max(http: &reqwest::Client, url: &str, metric: &str) -> f64 {
    let Ok(r) = http.get(format!("{url}/metrics")).send().await else { return 0.0 };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.strip_prefix(metric).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

/// CPU time (user + system, seconds) of every service with a pid file, of
/// the Redis server and of this driver: where the machine's two cores went.
fn cpu_seconds(pids: &std::path::Path) -> BTreeMap<String, f64> {
    fn of(pid: &str) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0) // USER_HZ
    }
    let mut out = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(pids) {
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "pid") {
                if let Some(s) = std::fs::read_to_string(&p).ok().and_then(|pid| of(pid.trim())) {
                    out.insert(p.file_stem().unwrap().to_string_lossy().into_owned(), s);
                }
            }
        }
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for e in procs.flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if pid.bytes().all(|b| b.is_ascii_digit()) && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "redis-server") {
                if let Some(s) = of(&pid) {
                    *out.entry("redis".to_string()).or_default() += s;
                }
            }
        }
    }
    if let Some(s) = of("self") {
        out.insert("driver".to_string(), s);
    }
    out
}

/// Rules whose pattern ends in an absence, with how their matches are
/// decided: not by their last event but when event time passes the end of
/// the absence (the last stage's own window after the event before it, or
/// the rule's window after its first event).
#[derive(Clone, Copy)]
enum AbsenceEnd {
    AfterLast(i64),
    AfterFirst(i64),
}

fn absence_rules(dir: &std::path::Path) -> anyhow::Result<BTreeMap<String, AbsenceEnd>> {
    let mut out = BTreeMap::new();
    if !dir.exists() {
        return Ok(out);
    }
    for spec in cepheid_loadtest::examples::load_rules(&[dir.to_path_buf()])? {
        if let Some(last) = spec.pattern.last().filter(|s| s.negate) {
            let end = match (last.within, spec.within) {
                (Some(w), _) => Some(AbsenceEnd::AfterLast(w)),
                (None, Some(w)) => Some(AbsenceEnd::AfterFirst(w)),
                (None, None) => None,
            };
            if let Some(end) = end {
                out.insert(spec.id.clone(), end);
            }
        }
    }
    Ok(out)
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let absences = absence_rules(&a.rules)?;
    let shards: Vec<String> = a.shards.split(',').map(str::to_string).collect();
    // Event time starts now (or after the previous run's events: the cluster's
    // watermark only goes forward) and advances with the target rate, so that
    // event time keeps pace with the clock when the load is paced; unpaced,
    // one second of event time per 1 000 events (windows close, the watermark moves).
    let next_file = a.pids.join("loadtest-next-event-ms");
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let start_ms = now_ms.max(std::fs::read_to_string(&next_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0));
    let event_rate = if a.rate > 0.0 { a.rate } else { 1000.0 };
    let lines = generate(&Params {
        events: a.events,
        users: a.users,
        products: a.products,
        seed: a.seed,
        rate: event_rate,
        start_ms,
        warm_ms: a.warm_s * 1000,
        ..Params::default()
    });
    let last_ms = lines.iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["eventTime"].as_i64()).max().unwrap_or(start_ms);
    std::fs::write(&next_file, (last_ms + 10_000).to_string())?;
    let http = reqwest::Client::new();
    let routed0 = scrape(&http, &a.router, "cepheid_router_routed_total").await?;
    let mut consumed0 = 0.0;
    let mut matched0 = 0.0;
    for s in &shards {
        consumed0 += scrape(&http, s, "cepheid_shard_events_total").await?;
        matched0 += scrape(&http, s, "cepheid_shard_matches_total").await?;
    }
    let dedup0 = scrape_max(&http, &a.notifier, "cepheid_notifier_deduplicated_total").await;
    let read0 = scrape_max(&http, &a.notifier, "cepheid_notifier_records_total").await;
    // The alert file is followed from its current end (read incrementally, so
    // that the driver's own CPU use stays small next to the cluster's).
    let seen0 = std::fs::metadata(&a.alerts).map(|m| m.len()).unwrap_or(0);

    // Alert watcher: stamps each new line when first seen.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let path = a.alerts.clone();
    let watcher = tokio::spawn(async move {
        use std::io::{Read, Seek, SeekFrom};
        // (last event time, when seen, detected_at, rule, first event time)
        let mut stamped: Vec<(i64, Instant, i64, String, i64)> = Vec::new();
        let mut offset = seen0;
        let mut partial = String::new();
        loop {
            if let Ok(mut f) = std::fs::File::open(&path) {
                let mut chunk = String::new();
                if f.seek(SeekFrom::Start(offset)).is_ok() && f.read_to_string(&mut chunk).is_ok() {
                    offset += chunk.len() as u64;
                    partial.push_str(&chunk);
                    let now = Instant::now();
                    let complete = partial.rfind('\n').map_or(0, |i| i + 1);
                    for l in partial[..complete].lines() {
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                            if v["match"]["kind"] == "match" {
                                stamped.push((
                                    v["match"]["last_event_time"].as_i64().unwrap_or(0),
                                    now,
                                    v["match"]["detected_at"].as_i64().unwrap_or(0),
                                    v["match"]["rule_id"].as_str().unwrap_or_default().to_string(),
                                    v["match"]["first_event_time"].as_i64().unwrap_or(0),
                                ));
                            }
                        }
                    }
                    partial.drain(..complete);
                }
            }
            if *stop_rx.borrow() {
                return stamped;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                _ = stop_rx.changed() => {}
            }
        }
    });

    let times: Vec<Option<i64>> = lines.iter().map(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["eventTime"].as_i64())).collect();
    let cpu0 = cpu_seconds(&a.pids);
    let start = Instant::now();
    let start_wall_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64() * 1e3;
    // Keys unique to this run (`--keys`): posts of an earlier run are not repeats.
    let run_id = format!("{}-{}", std::process::id(), start_wall_ms as u64);
    let mut acked: BTreeMap<i64, Instant> = BTreeMap::new(); // event time → ack of its batch
    let mut frontier: Vec<(i64, Instant)> = Vec::new(); // highest event time posted so far, at each ack
    let mut accepted = 0u64;
    let inflight = std::sync::Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let mut posts = Vec::new();
    for (i, chunk) in lines.chunks(a.batch).enumerate() {
        if a.rate > 0.0 {
            let due = start + Duration::from_secs_f64((i * a.batch) as f64 / a.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = inflight.clone().acquire_owned().await?;
        let (http, url, body) = (http.clone(), format!("{}/v1/events?source=clickstream", a.ingest), chunk.join("\n"));
        let key = a.keys.then(|| format!("loadtest-{run_id}-{i}"));
        posts.push(tokio::spawn(async move {
            let mut req = http.post(url).body(body);
            if let Some(k) = key {
                req = req.header("Idempotency-Key", k);
            }
            let r = req.send().await?;
            let status = r.status();
            let text = r.text().await?;
            let now = Instant::now();
            drop(permit);
            anyhow::Ok((status, text, now))
        }));
    }
    let mut batch_acks: Vec<(i64, Instant)> = Vec::new(); // per batch: its highest event time, its ack
    for (i, post) in posts.into_iter().enumerate() {
        let (status, text, now) = post.await??;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("ingest answered batch {i} with {status}: {e}: {}", &text[..text.len().min(300)]))?;
        anyhow::ensure!(status.as_u16() == 202 || status.as_u16() == 400, "ingest answered batch {i} with {status}: {}", &text[..text.len().min(300)]);
        accepted += v["accepted"].as_u64().unwrap_or(0);
        let chunk_times = &times[i * a.batch..((i + 1) * a.batch).min(times.len())];
        for t in chunk_times.iter().flatten() {
            acked.entry(*t).or_insert(now);
        }
        batch_acks.push((chunk_times.iter().flatten().copied().max().unwrap_or(i64::MIN), now));
    }
    // The frontier: each new highest event time, with the earliest ack of a
    // batch that holds it or a later one (posts in flight together may be
    // acknowledged out of order).
    let mut earliest = None::<Instant>;
    let mut suffix_min: Vec<Instant> = batch_acks.iter().rev().map(|(_, at)| *earliest.insert(earliest.map_or(*at, |e: Instant| e.min(*at)))).collect();
    suffix_min.reverse();
    for ((m, _), at) in batch_acks.iter().zip(suffix_min) {
        if frontier.last().is_none_or(|(x, _)| m > x) {
            frontier.push((*m, at));
        }
    }
    let posted = start.elapsed();
    // Wait until the shards consumed every keyed record the router published for these events.
    let deadline = Instant::now() + Duration::from_secs(600);
    let done = loop {
        let routed = scrape(&http, &a.router, "cepheid_router_routed_total").await? - routed0;
        let mut consumed = -consumed0;
        for s in &shards {
            consumed += scrape(&http, s, "cepheid_shard_events_total").await?;
        }
        if routed > 0.0 && consumed >= routed {
            break start.elapsed();
        }
        anyhow::ensure!(Instant::now() < deadline, "shards consumed {consumed} of {routed} keyed records after 10 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await; // let the last alerts through the notifier
    // Matches the shards decided in the run, and match records the notifier
    // dropped as already delivered: with no shard restarted or rebalanced
    // (whose replays send matches again), a duplicate has come with a match
    // record the notifier's consumer passed over (BENCHMARKS.md, "The broker
    // skips a match record"), and that match is missing.
    let mut matched = -matched0;
    for s in &shards {
        matched += scrape(&http, s, "cepheid_shard_matches_total").await?;
    }
    // Each shard's keys at the end (where its memory goes): running, with state, passivated, loaded back.
    let mut shard_keys = serde_json::Map::new();
    for s in &shards {
        let mut m = serde_json::Map::new();
        for (name, metric) in [
            ("running", "cepheid_shard_active_keys"),
            ("stored", "cepheid_shard_stored_keys"),
            ("passivated", "cepheid_shard_passivated_total"),
            ("passivated_for_bound", "cepheid_shard_passivated_for_bound_total"),
            ("restored", "cepheid_shard_restored_keys_total"),
        ] {
            m.insert(name.into(), serde_json::json!(scrape(&http, s, metric).await?));
        }
        shard_keys.insert(s.clone(), m.into());
    }
    let deduplicated = scrape_max(&http, &a.notifier, "cepheid_notifier_deduplicated_total").await - dedup0;
    // Match records the notifier read (matches and timeouts; a record read again counts again).
    let notifier_records = scrape_max(&http, &a.notifier, "cepheid_notifier_records_total").await - read0;
    if deduplicated > 0.0 {
        eprintln!("warning: the notifier dropped {deduplicated} match record(s) of this run as duplicates; unless a shard restarted or partitions moved, alerts are missing");
    }
    let _ = stop_tx.send(true);
    let stamped = watcher.await?;
    let mut lat: Vec<f64> = stamped
        .iter()
        .filter_map(|(t, seen, _, _, _)| acked.get(t).map(|ack| seen.saturating_duration_since(*ack).as_secs_f64() * 1e3))
        .collect();
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    // Beyond the lateness: from the first ack that took the event time past the
    // point that decides the match (its last event, or the end of its absence) + bound.
    // Where event time decides a match: its last event, or the end of its absence.
    let decided_of = |(t, _, _, rule, first): &(i64, Instant, i64, String, i64)| -> i64 {
        match absences.get(rule) {
            Some(AbsenceEnd::AfterLast(w)) => t + w,
            Some(AbsenceEnd::AfterFirst(w)) => first + w,
            None => *t,
        }
    };
    let beyond_of = |st: &(i64, Instant, i64, String, i64)| -> Option<f64> {
        let (t, seen) = (&st.0, &st.1);
        if !acked.contains_key(t) {
            return None; // matches of this run's events, as above
        }
        let decided = decided_of(st);
        let i = frontier.partition_point(|(m, _)| *m <= decided + a.lateness_ms);
        frontier.get(i).map(|(_, ack)| seen.saturating_duration_since(*ack).as_secs_f64() * 1e3)
    };
    if let Some(path) = &a.dump {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for st in &stamped {
            if let Some(x) = beyond_of(st) {
                let seen_ms = st.1.saturating_duration_since(start).as_secs_f64() * 1e3;
                // When the shard decided it, on the same scale (wall clocks of one machine).
                let detected_ms = (st.2 > 0).then_some(st.2 as f64 - start_wall_ms);
                writeln!(f, "{}", serde_json::json!({"seen_ms": seen_ms, "beyond_ms": x, "rule": st.3, "detected_ms": detected_ms, "decided_event_ms": decided_of(st)}))?;
            }
        }
    }
    let mut beyond: Vec<f64> = stamped.iter().filter_map(beyond_of).collect();
    // The same without the matches decided in the last `cooldown_ms` of event time.
    let end = frontier.last().map_or(i64::MAX, |(m, _)| *m);
    let mut steady: Vec<f64> = stamped
        .iter()
        .filter(|st| decided_of(st) + a.lateness_ms < end - a.cooldown_ms)
        .filter_map(beyond_of)
        .collect();
    steady.sort_by(|x, y| x.partial_cmp(y).unwrap());
    beyond.sort_by(|x, y| x.partial_cmp(y).unwrap());
    // The same per rule: rules whose matches are decided only by a later event
    // or a window's end wait for event time beyond their last event.
    let mut by_rule: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for s in &stamped {
        if let Some(x) = beyond_of(s) {
            by_rule.entry(s.3.as_str()).or_default().push(x);
        }
    }
    let beyond_by_rule: BTreeMap<&str, serde_json::Value> = by_rule
        .into_iter()
        .map(|(r, mut v)| {
            v.sort_by(|x, y| x.partial_cmp(y).unwrap());
            (r, serde_json::json!({"n": v.len(), "p50": pct(&v, 0.5), "p95": pct(&v, 0.95), "p99": pct(&v, 0.99)}))
        })
        .collect();
    let mut after_shard: Vec<f64> = stamped
        .iter()
        .filter(|(t, _, d, _, _)| acked.contains_key(t) && *d > 0)
        .map(|(_, seen, d, _, _)| start_wall_ms + seen.saturating_duration_since(start).as_secs_f64() * 1e3 - *d as f64)
        .collect();
    after_shard.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let mut rss = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(&a.pids) {
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "pid") {
                let pid = std::fs::read_to_string(&p)?.trim().to_string();
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kb) = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)) {
                    rss.insert(p.file_stem().unwrap().to_string_lossy().into_owned(), kb.parse::<u64>().unwrap_or(0) / 1024);
                }
            }
        }
    }
    let cpu1 = cpu_seconds(&a.pids);
    let cpu: BTreeMap<String, f64> = cpu1.iter().map(|(k, v)| (k.clone(), ((v - cpu0.get(k).copied().unwrap_or(0.0)) * 100.0).round() / 100.0)).collect();
    let eps = accepted as f64 / done.as_secs_f64();
    let report = serde_json::json!({
        "events": accepted, "batch": a.batch, "target_rate": a.rate, "idempotency_keys": a.keys,
        "out_of_orderness_ms": a.lateness_ms,
        "start_wall_ms": start_wall_ms,
        "post_seconds": posted.as_secs_f64(), "through_seconds": done.as_secs_f64(), "events_per_second": eps,
        "alerts_measured": lat.len(),
        "shard_matches": matched, "notifier_deduplicated": deduplicated, "notifier_records": notifier_records,
        "latency_ms": {"p50": pct(&lat, 0.5), "p95": pct(&lat, 0.95), "p99": pct(&lat, 0.99)},
        "beyond_lateness_measured": beyond.len(),
        "beyond_lateness_ms": {"p50": pct(&beyond, 0.5), "p95": pct(&beyond, 0.95), "p99": pct(&beyond, 0.99)},
        "beyond_lateness_steady_measured": steady.len(),
        "beyond_lateness_steady_ms": {"p50": pct(&steady, 0.5), "p95": pct(&steady, 0.95), "p99": pct(&steady, 0.99)},
        "beyond_lateness_by_rule_ms": beyond_by_rule,
        "after_shard_ms": {"p50": pct(&after_shard, 0.5), "p95": pct(&after_shard, 0.95), "p99": pct(&after_shard, 0.99)},
        "rss_mib": rss,
        "shard_keys": shard_keys,
        "cpu_seconds": cpu,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(j) = a.json {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(j)?;
        writeln!(f, "{report}")?;
    }
    Ok(())
}
