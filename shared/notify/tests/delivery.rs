//! The reach layer against local HTTP servers: one behaving as the Feishu
//! custom-bot API (checks the signature and the timestamp window, answers
//! codes 0, 11232 and 19021 as the real one does) and a webhook receiver.
//! Time is a manual clock; waiting (backoff, rate limits) moves it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Json;
use cepheid_notify::config::{FeishuFormat, LookupConfig, NotifierConfig, RetryConfig, Secret, Severity, TargetConfig};
use cepheid_notify::delivery::{ClockSleeper, NotifierDeps, Sleeper};
use cepheid_notify::sign::{feishu_sign, webhook_sign};
use cepheid_notify::stores::Store;
use cepheid_notify::{Notifier, Submitted};
use cepheid_rules::{ActionSpec, EnrichSpec};
use cepheid_types::{ManualClock, MatchKind, MatchRecord};
use serde_json::{json, Value};

const T0: i64 = 1_700_000_000_000;

#[derive(Default)]
struct Mock {
    secret: Option<String>,
    /// Feishu codes (or HTTP statuses for the webhook) to answer, in order; then 0 / 200.
    script: VecDeque<i64>,
    /// (clock time at arrival, body, headers)
    got: Vec<(i64, Value, HeaderMap)>,
    clock: Option<ManualClock>,
}

type Shared = Arc<Mutex<Mock>>;

async fn feishu_api(State(m): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    let mut m = m.lock().unwrap();
    let now = m.clock.as_ref().map(cepheid_types::Clock::now).unwrap_or(T0);
    m.got.push((now, body.clone(), HeaderMap::new()));
    if let Some(secret) = m.secret.clone() {
        let ts: i64 = body["timestamp"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
        let fresh = (now / 1000 - ts).abs() <= 3600;
        if !fresh || body["sign"].as_str() != Some(feishu_sign(ts, &secret).as_str()) {
            return Json(json!({"code": 19021, "msg": "sign match fail or timestamp is not within one hour from current time", "data": {}}));
        }
    }
    match m.script.pop_front() {
        Some(11232) => Json(json!({"code": 11232, "msg": "frequency limited psm", "data": {}})),
        Some(code) if code != 0 => Json(json!({"code": code, "msg": "error", "data": {}})),
        _ => Json(json!({"StatusCode": 0, "StatusMessage": "success", "code": 0, "data": {}, "msg": "success"})),
    }
}

async fn webhook_rx(State(m): State<Shared>, headers: HeaderMap, body: String) -> StatusCode {
    let mut m = m.lock().unwrap();
    let now = m.clock.as_ref().map(cepheid_types::Clock::now).unwrap_or(T0);
    m.got.push((now, serde_json::from_str(&body).unwrap_or(Value::Null), headers.clone()));
    if let Some(secret) = &m.secret {
        let ts: i64 = headers["x-cepheid-timestamp"].to_str().unwrap().parse().unwrap();
        assert_eq!(headers["x-cepheid-signature"].to_str().unwrap(), webhook_sign(secret, ts, body.as_bytes()));
    }
    match m.script.pop_front() {
        Some(code) if code != 200 => StatusCode::from_u16(code as u16).unwrap(),
        _ => StatusCode::OK,
    }
}

async fn never_answers() -> Json<Value> {
    std::future::pending::<()>().await;
    unreachable!()
}

async fn serve(mock: Shared) -> SocketAddr {
    let app = axum::Router::new()
        .route("/feishu", post(feishu_api))
        .route("/webhook", post(webhook_rx))
        .route("/slow/{key}", get(never_answers))
        .with_state(mock);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

fn record(id: &str, key: &str, product: &str) -> MatchRecord {
    let line = json!({
        "rule_id": "cart_abandon", "rule_version": 1, "kind": "match", "key": {"userId": key},
        "match_id": id, "first_event_time": T0, "last_event_time": T0, "detected_at": T0,
        "stages": {"cart": [{"eventTime": T0, "productId": product, "price": 520.0, "userId": key}], "bought": []}
    });
    let r = MatchRecord::from_json_line(&line.to_string()).unwrap();
    assert_eq!(r.kind, MatchKind::Match);
    r
}

fn action(targets: &[&str], template: Option<&str>) -> ActionSpec {
    ActionSpec { targets: targets.iter().map(|s| s.to_string()).collect(), template: template.map(str::to_string), ..Default::default() }
}

fn feishu(addr: SocketAddr, secret: Option<&str>, format: FeishuFormat) -> TargetConfig {
    TargetConfig::Feishu {
        url: format!("http://{addr}/feishu"),
        secret: secret.map(|s| Secret(s.into())),
        format,
        severity: Severity::Critical,
        link: Some("https://example.com/alerts".into()),
        per_second: 5,
        per_minute: 100,
        timeout_ms: 5_000,
    }
}

async fn start(targets: Vec<(&str, TargetConfig)>, clock: &ManualClock, sleeper: Arc<dyn Sleeper>, store: Store, tweak: impl FnOnce(&mut NotifierConfig)) -> Notifier {
    let mut cfg = NotifierConfig {
        targets: targets.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        retry: RetryConfig { max_attempts: 4, base_ms: 500, max_ms: 30_000 },
        dedupe_ttl_ms: 86_400_000,
        ..Default::default()
    };
    tweak(&mut cfg);
    Notifier::start(cfg, NotifierDeps { clock: Arc::new(clock.clone()), sleeper, store, seed: 7, bus: Some(cepheid_bus::Bus::memory()) }).await.unwrap()
}

fn mock(clock: &ManualClock, secret: Option<&str>, script: &[i64]) -> Shared {
    Arc::new(Mutex::new(Mock { secret: secret.map(str::to_string), script: script.iter().copied().collect(), got: Vec::new(), clock: Some(clock.clone()) }))
}

#[tokio::test]
async fn signed_text_and_card_bodies() {
    let clock = ManualClock::new(T0);
    let m = mock(&clock, Some("demo-secret"), &[]);
    let addr = serve(m.clone()).await;
    let n = start(
        vec![("growth", feishu(addr, Some("demo-secret"), FeishuFormat::Text)), ("risk", feishu(addr, Some("demo-secret"), FeishuFormat::Card))],
        &clock,
        Arc::new(ClockSleeper(clock.clone())),
        Store::memory(),
        |_| {},
    ).await;
    let a = action(&["feishu:growth", "feishu:risk"], Some("user {{ key.userId }} left ¥{{ cart[0].price }} in the cart"));
    assert_eq!(n.submit(&record("m1", "u42", "p1"), "High-value cart", &a).await.unwrap(), Submitted::Queued(2));
    n.idle().await;
    let got = m.lock().unwrap().got.clone();
    assert_eq!(got.len(), 2);
    let text = got.iter().find(|g| g.1["msg_type"] == "text").unwrap();
    assert_eq!(text.1["content"]["text"], "user u42 left ¥520.0 in the cart");
    assert_eq!(text.1["timestamp"], (T0 / 1000).to_string());
    let card = got.iter().find(|g| g.1["msg_type"] == "interactive").unwrap();
    assert_eq!(card.1["card"]["header"]["template"], "red");
    assert_eq!(card.1["card"]["header"]["title"]["content"], "High-value cart");
    assert_eq!(card.1["card"]["elements"][1]["actions"][0]["url"], "https://example.com/alerts");
    let metrics = n.metrics();
    assert_eq!((metrics["growth"].sent, metrics["risk"].sent), (1, 1));
}

#[tokio::test]
async fn retry_on_11232_then_success_and_no_retry_on_19021() {
    let clock = ManualClock::new(T0);
    let m = mock(&clock, Some("right"), &[11232]);
    let addr = serve(m.clone()).await;
    let dir = tempdir();
    let dead = dir.join("dead.jsonl");
    let n = start(
        vec![("ok", feishu(addr, Some("right"), FeishuFormat::Text)), ("badsig", feishu(addr, Some("wrong"), FeishuFormat::Text))],
        &clock,
        Arc::new(ClockSleeper(clock.clone())),
        Store::memory(),
        |c| c.dead_letter = Some(dead.clone()),
    ).await;
    n.submit(&record("m1", "u1", "p1"), "r", &action(&["feishu:ok"], None)).await.unwrap();
    n.idle().await;
    let ok = &n.metrics()["ok"];
    assert_eq!((ok.sent, ok.retried, ok.attempts), (1, 1, 2));
    // The backoff moved the clock by at least the base delay.
    assert!(cepheid_types::Clock::now(&clock) >= T0 + 500);

    n.submit(&record("m2", "u1", "p1"), "r", &action(&["feishu:badsig"], None)).await.unwrap();
    n.idle().await;
    let bad = &n.metrics()["badsig"];
    assert_eq!((bad.sent, bad.retried, bad.failed, bad.dead_lettered, bad.attempts), (0, 0, 1, 1, 1));
    let dl: Value = serde_json::from_str(std::fs::read_to_string(&dead).unwrap().trim()).unwrap();
    assert!(dl["error"].as_str().unwrap().contains("19021"));
    assert_eq!(dl["match"]["match_id"], "m2");
}

#[tokio::test]
async fn rate_limit_holds_under_a_burst() {
    let clock = ManualClock::new(T0);
    let m = mock(&clock, None, &[]);
    let addr = serve(m.clone()).await;
    let n = start(vec![("bot", feishu(addr, None, FeishuFormat::Text))], &clock, Arc::new(ClockSleeper(clock.clone())), Store::memory(), |_| {}).await;
    for i in 0..12 {
        n.submit(&record(&format!("m{i}"), "u1", "p1"), "r", &action(&["feishu:bot"], None)).await.unwrap();
    }
    n.idle().await;
    let times: Vec<i64> = m.lock().unwrap().got.iter().map(|g| g.0).collect();
    assert_eq!(times.len(), 12, "all delivered");
    for (i, t) in times.iter().enumerate() {
        let in_window = times.iter().filter(|u| **u >= *t && **u < t + 1_000).count();
        assert!(in_window <= 5, "more than 5 requests in the second after request {i}: {times:?}");
    }
    assert!(times[11] - times[0] >= 2_000, "{times:?}");
}

#[tokio::test]
async fn dedupe_by_match_id_and_by_window() {
    let clock = ManualClock::new(T0);
    let m = mock(&clock, None, &[]);
    let addr = serve(m.clone()).await;
    let n = start(vec![("bot", feishu(addr, None, FeishuFormat::Text))], &clock, Arc::new(ClockSleeper(clock.clone())), Store::memory(), |_| {}).await;
    // The same match delivered twice (at-least-once input): one request.
    let plain = action(&["feishu:bot"], None);
    n.submit(&record("same", "u1", "p1"), "r", &plain).await.unwrap();
    n.idle().await;
    n.submit(&record("same", "u1", "p1"), "r", &plain).await.unwrap();
    n.idle().await;
    assert_eq!(m.lock().unwrap().got.len(), 1);
    assert_eq!(n.metrics()["bot"].deduplicated, 1);
    // Two copies queued together (the worker takes them in one batch): one request.
    n.submit(&record("twice", "u1", "p1"), "r", &plain).await.unwrap();
    n.submit(&record("twice", "u1", "p1"), "r", &plain).await.unwrap();
    n.idle().await;
    assert_eq!(m.lock().unwrap().got.len(), 2);
    assert_eq!(n.metrics()["bot"].deduplicated, 2);
    // One alert per rule and key within the window.
    let windowed = ActionSpec { dedupe: Some(3_600_000), ..plain };
    assert_eq!(n.submit(&record("w1", "u2", "p1"), "r", &windowed).await.unwrap(), Submitted::Queued(1));
    assert_eq!(n.submit(&record("w2", "u2", "p2"), "r", &windowed).await.unwrap(), Submitted::Deduplicated);
    assert_eq!(n.submit(&record("w3", "u3", "p2"), "r", &windowed).await.unwrap(), Submitted::Queued(1));
    clock.advance(3_600_000);
    assert_eq!(n.submit(&record("w4", "u2", "p3"), "r", &windowed).await.unwrap(), Submitted::Queued(1));
    n.idle().await;
    assert_eq!(m.lock().unwrap().got.len(), 5);
}

/// A dedupe window is taken by the match that opened it, and a second try of
/// that same match (its first attempt carried out in Redis, the answer lost
/// to a timeout, the call retried) still finds it its own, in both stores;
/// before, the retry found the window "taken" and the alert was dropped.
#[tokio::test]
async fn a_dedupe_window_stays_its_openers_on_a_retry() {
    let _shared = PAUSES.read().await;
    let clock = ManualClock::new(T0);
    let prefix = format!("cepheid-test:notify-once:{}:{}", std::process::id(), T0);
    for store in [Store::memory(), Store::redis("redis://127.0.0.1:6379", &prefix).await.unwrap()] {
        assert!(store.set_once("dedupe:r:u1", "m1", 60_000, &clock).await.unwrap(), "free: taken by m1");
        assert!(store.set_once("dedupe:r:u1", "m1", 60_000, &clock).await.unwrap(), "m1 again: still its own");
        assert!(!store.set_once("dedupe:r:u1", "m2", 60_000, &clock).await.unwrap(), "m2: within m1's window");
        assert!(store.set_once("dedupe:r:u2", "m2", 60_000, &clock).await.unwrap(), "another key");
    }
    cepheid_state::delete_prefix("redis://127.0.0.1:6379", &prefix).await.unwrap();
    // Through the notifier: the opener submitted twice gets its one alert.
    let m = mock(&clock, None, &[]);
    let addr = serve(m.clone()).await;
    let n = start(vec![("bot", feishu(addr, None, FeishuFormat::Text))], &clock, Arc::new(ClockSleeper(clock.clone())), Store::memory(), |_| {}).await;
    let windowed = ActionSpec { dedupe: Some(3_600_000), ..action(&["feishu:bot"], None) };
    assert_eq!(n.submit(&record("w1", "u2", "p1"), "r", &windowed).await.unwrap(), Submitted::Queued(1));
    assert_eq!(n.submit(&record("w1", "u2", "p1"), "r", &windowed).await.unwrap(), Submitted::Queued(1));
    assert_eq!(n.submit(&record("w2", "u2", "p1"), "r", &windowed).await.unwrap(), Submitted::Deduplicated);
    n.idle().await;
    assert_eq!(m.lock().unwrap().got.len(), 1, "the repeat of w1 is dropped by its match id");
}

/// The test that pauses Redis runs alone (its pause would hold the other
/// tests' Redis commands back past their timeouts).
static PAUSES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A slow Redis (every client paused 1.2 s) delays the delivered-ids lookup;
/// it does not fail it. Failed, it counts as "nothing delivered yet", and
/// the alerts of the batch would go out again.
#[tokio::test]
async fn a_slow_redis_delays_the_delivered_lookup_without_failing_it() {
    let _alone = PAUSES.write().await;
    let clock = ManualClock::new(T0);
    let prefix = format!("cepheid-test:notify-slow:{}:{}", std::process::id(), T0);
    let store = Store::redis("redis://127.0.0.1:6379", &prefix).await.unwrap();
    store.set_all(&["delivered:bot:m1".to_string()], 60_000, &clock).await.unwrap();
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(1_200).arg("ALL").query_async(&mut c).await.unwrap();
    let started = std::time::Instant::now();
    let seen = store.which_set(&["delivered:bot:m1".to_string(), "delivered:bot:m2".to_string()], &clock).await;
    let took = started.elapsed();
    // (The pause ends by itself: under `ALL` even `CLIENT UNPAUSE` waits for it.)
    assert_eq!(seen.unwrap(), vec![true, false]);
    assert!(took >= std::time::Duration::from_millis(1_000), "the pause held the lookup back ({took:?})");
    cepheid_state::delete_prefix("redis://127.0.0.1:6379", &prefix).await.unwrap();
}

#[tokio::test]
async fn dead_letter_after_n_attempts_and_a_failing_target_does_not_delay_another() {
    let clock = ManualClock::new(T0);
    let down = mock(&clock, Some("s"), &[503, 503, 503, 503, 503]);
    let up = mock(&clock, None, &[]);
    let (a, b) = (serve(down.clone()).await, serve(up.clone()).await);
    let webhook = |addr: SocketAddr, secret: Option<&str>| TargetConfig::Webhook {
        url: format!("http://{addr}/webhook"),
        secret: secret.map(|s| Secret(s.into())),
        headers: [("x-team".to_string(), "growth".to_string())].into(),
        timeout_ms: 5_000,
        per_second: None,
    };
    // The failing target's backoff waits on a gate the test holds shut.
    let gate = Arc::new(Gate::default());
    let dir = tempdir();
    let n = start(vec![("crm", webhook(a, Some("s"))), ("ops", webhook(b, None))], &clock, gate.clone(), Store::memory(), |c| {
        c.dead_letter = Some(dir.join("dead.jsonl"))
    }).await;
    n.submit(&record("m1", "u1", "p1"), "r", &action(&["webhook:crm", "webhook:ops"], Some("hello {{ key.userId }}"))).await.unwrap();
    gate.waiting.notified().await; // crm failed once and is now backing off
    // ops was delivered while crm waits.
    let ops_done = {
        let mut tries = 0;
        loop {
            if n.metrics()["ops"].sent == 1 {
                break true;
            }
            tries += 1;
            if tries > 1000 {
                break false;
            }
            tokio::task::yield_now().await;
        }
    };
    assert!(ops_done);
    assert_eq!(n.metrics()["crm"].sent, 0);
    let got = up.lock().unwrap().got.clone();
    assert_eq!(got[0].1["message"], "hello u1");
    assert_eq!(got[0].2["x-team"], "growth");
    gate.open();
    n.idle().await;
    let crm = &n.metrics()["crm"];
    assert_eq!((crm.attempts, crm.retried, crm.dead_lettered), (4, 3, 1));
    let dl: Value = serde_json::from_str(std::fs::read_to_string(dir.join("dead.jsonl")).unwrap().trim()).unwrap();
    assert_eq!(dl["attempts"], 4);
    assert!(dl["error"].as_str().unwrap().contains("503"));
}

#[tokio::test]
async fn delay_survives_a_notifier_restart() {
    let _shared = PAUSES.read().await;
    let clock = ManualClock::new(T0);
    let m = mock(&clock, None, &[]);
    let addr = serve(m.clone()).await;
    let prefix = format!("cepheid-test:notify-delay:{}:{}", std::process::id(), T0);
    let store = || async { Store::redis("redis://127.0.0.1:6379", &prefix).await.unwrap() };
    let a = ActionSpec { delay: Some(300_000), ..action(&["feishu:bot"], None) };
    {
        let n = start(vec![("bot", feishu(addr, None, FeishuFormat::Text))], &clock, Arc::new(ClockSleeper(clock.clone())), store().await, |_| {}).await;
        assert_eq!(n.submit(&record("d1", "u1", "p1"), "r", &a).await.unwrap(), Submitted::Delayed(T0 + 300_000));
        assert_eq!(n.poll_delayed().await.unwrap(), 0);
    } // the notifier goes away
    let n = start(vec![("bot", feishu(addr, None, FeishuFormat::Text))], &clock, Arc::new(ClockSleeper(clock.clone())), store().await, |_| {}).await;
    assert_eq!(n.delayed().await.unwrap(), 1);
    clock.advance(299_999);
    assert_eq!(n.poll_delayed().await.unwrap(), 0);
    clock.advance(1);
    assert_eq!(n.poll_delayed().await.unwrap(), 1);
    n.idle().await;
    assert_eq!(m.lock().unwrap().got.len(), 1);
    assert_eq!(n.delayed().await.unwrap(), 0);
    cepheid_state::delete_prefix("redis://127.0.0.1:6379", &prefix).await.unwrap();
}

#[tokio::test]
async fn enrichment_hit_miss_and_timeout() {
    let _shared = PAUSES.read().await;
    let clock = ManualClock::new(T0);
    let m = mock(&clock, None, &[]);
    let addr = serve(m.clone()).await;
    let prefix = format!("cepheid-test:notify-enrich:{}", std::process::id());
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("HSET").arg(format!("{prefix}:products:p1")).arg("name").arg("Phone X").query_async(&mut con).await.unwrap();
    let n = start(vec![("bot", feishu(addr, None, FeishuFormat::Text))], &clock, Arc::new(ClockSleeper(clock.clone())), Store::memory(), |c| {
        c.lookups.insert(
            "products".into(),
            LookupConfig::Redis { url: "redis://127.0.0.1:6379".into(), pattern: format!("{prefix}:products:{{key}}"), ttl_ms: 60_000, timeout_ms: 2_000 },
        );
        c.lookups.insert("slow".into(), LookupConfig::Http { url: format!("http://{addr}/slow/{{key}}"), ttl_ms: 60_000, timeout_ms: 100 });
    }).await;
    let a = ActionSpec {
        enrich: vec![
            EnrichSpec { lookup: "products".into(), key: "cart.productId".into(), alias: "product".into() },
            EnrichSpec { lookup: "slow".into(), key: "cart.userId".into(), alias: "profile".into() },
        ],
        ..action(&["feishu:bot"], Some("[{{ product.name }}] [{{ profile.level }}]"))
    };
    n.submit(&record("e1", "u1", "p1"), "r", &a).await.unwrap();
    n.submit(&record("e2", "u1", "p2"), "r", &a).await.unwrap();
    n.idle().await;
    let texts: Vec<String> = m.lock().unwrap().got.iter().map(|g| g.1["content"]["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(texts, vec!["[Phone X] []", "[] []"]);
    let s = n.enrich_stats();
    assert_eq!((s.hits, s.misses), (1, 1));
    assert!(s.timeouts >= 1);
    let _: () = redis::cmd("DEL").arg(format!("{prefix}:products:p1")).query_async(&mut con).await.unwrap();
}

/// A sleeper whose waits last until the test opens the gate.
#[derive(Default)]
struct Gate(Arc<GateInner>);

#[derive(Default)]
struct GateInner {
    open: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
    waiting: tokio::sync::Notify,
}

impl std::ops::Deref for Gate {
    type Target = GateInner;
    fn deref(&self) -> &GateInner {
        &self.0
    }
}

impl Gate {
    fn open(&self) {
        self.0.open.store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }
}

impl Sleeper for Gate {
    fn sleep(&self, _d: std::time::Duration) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let g = self.0.clone();
        Box::pin(async move {
            g.waiting.notify_one();
            loop {
                let n = g.notify.notified();
                if g.open.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                n.await;
            }
        })
    }
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cepheid-notify-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn default_config_remembers_delivered_matches_for_a_day() {
    assert_eq!(NotifierConfig::default().dedupe_ttl_ms, 86_400_000);
}

#[tokio::test]
async fn kafka_target_puts_alerts_on_a_topic() {
    let clock = ManualClock::new(T0);
    let bus = cepheid_bus::Bus::memory();
    let mut cfg = NotifierConfig::default();
    cfg.targets.insert("alerts".into(), TargetConfig::Kafka { topic: "alerts".into(), partitions: 2 });
    let n = Notifier::start(
        cfg,
        NotifierDeps { clock: Arc::new(clock.clone()), sleeper: Arc::new(ClockSleeper(clock.clone())), store: Store::memory(), seed: 1, bus: Some(bus.clone()) },
    )
    .await
    .unwrap();
    n.submit(&record("k1", "u9", "p1"), "r", &action(&["kafka:alerts"], Some("{{ key.userId }}"))).await.unwrap();
    n.idle().await;
    let mut c = bus.subscribe("reader", &["alerts"]).unwrap();
    let m = c.recv().await.unwrap();
    assert_eq!(m.key.as_deref(), Some(&b"k1"[..]));
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["message"], "u9");
    assert_eq!(v["match"]["match_id"], "k1");
    assert!(matches!(n.resolve("webhook:alerts"), Err(cepheid_notify::NotifyError::KindMismatch { .. })));
}
