//! `cepheid run` applies rule files added, changed to a higher version,
//! deleted, or broken while events flow — without a restart, keeping the
//! partial matches of rules that did not change.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cepheid_cli::run::Pipeline;
use cepheid_cli::settings::{RedisSettings, RunSettings, Settings};
use cepheid_engine::engine::{EngineConfig, ManualClock, SourceConfig};

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
    fn take(&self) -> String {
        String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
    }
}

fn settings() -> Settings {
    Settings {
        engine: EngineConfig {
            default_source: SourceConfig { time_field: "t".into(), out_of_orderness_ms: 0 },
            ..Default::default()
        },
        run: RunSettings { source: "clicks".into(), rules_poll_ms: 100, progress_interval_ms: 1000 },
        redis: RedisSettings { url: "redis://127.0.0.1:6379".into(), prefix: "cepheid".into() },
        notifier: Default::default(),
        kafka: None,
        notifier_service: None,
        ingest: None,
        router: None,
        shard: None,
        telemetry: Default::default(),
    }
}

fn rule(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

fn rule_ids(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{}@v{}", v["rule_id"].as_str().unwrap(), v["rule_version"])
        })
        .collect()
}

const A_V1: &str = r#"{"id":"a_then_b","version":1,"key_by":"user","pattern":[{"name":"a","where":"kind = 'a'"},{"name":"b","where":"kind = 'b'"}]}"#;
const A_V2: &str = r#"{"id":"a_then_b","version":2,"key_by":"user","pattern":[{"name":"a","where":"kind = 'a'"},{"name":"c","where":"kind = 'c'"}]}"#;
const B_V1: &str = r#"{"id":"two_bs","version":1,"key_by":"user","pattern":[{"name":"b","where":"kind = 'b'","times":2}]}"#;

#[test]
fn rule_changes_apply_while_running() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    rule(&rules, "a.json", A_V1);
    let (out, log) = (Shared::default(), Shared::default());
    let mut p = Pipeline::new(
        &settings(),
        "clicks",
        &rules,
        Arc::new(ManualClock::new(0)),
        Box::new(out.clone()),
        tmp.path().join("late.jsonl"),
        tmp.path().join("rejected.jsonl"),
        Box::new(log.clone()),
    )
    .unwrap();
    let mut n = 0;
    let mut ev = |p: &mut Pipeline, t: i64, kind: &str| {
        n += 1;
        p.line("test", n, &format!(r#"{{"t":{t},"user":"u1","kind":"{kind}"}}"#)).unwrap();
    };

    ev(&mut p, 1, "a");
    // A rule is added while `a_then_b` holds a partial match for u1.
    rule(&rules, "b.json", B_V1);
    p.poll_rules().unwrap();
    assert!(log.take().contains("rule `two_bs` version 1 loaded"));
    ev(&mut p, 2, "b");
    ev(&mut p, 3, "b");
    ev(&mut p, 4, "x");
    // The unchanged rule kept its partial match (a@1 then b@2); the new rule saw b@2, b@3.
    assert_eq!(rule_ids(&out.take()), vec!["a_then_b@v1", "two_bs@v1"]);

    // A new version replaces the old one with empty state.
    ev(&mut p, 5, "a");
    rule(&rules, "a.json", A_V2);
    p.poll_rules().unwrap();
    assert!(log.take().contains("replaced by version 2"));
    ev(&mut p, 6, "c");
    ev(&mut p, 7, "a");
    ev(&mut p, 8, "c");
    ev(&mut p, 9, "x");
    // Events wait in the reorder buffer until the watermark passes them, and
    // a rule change applies at once: a@5 (received, not yet released) is seen
    // by version 2, which matches a@5 c@6 and a@7 c@8.
    assert_eq!(rule_ids(&out.take()), vec!["a_then_b@v2", "a_then_b@v2"]);

    // A broken file is refused with its diagnostics; version 2 keeps running.
    rule(&rules, "a.json", r#"{"id":"a_then_b","version":3,"key_by":"user","pattern":[{"name":"a","where":"kind = = 'a'"}]}"#);
    p.poll_rules().unwrap();
    let l = log.take();
    assert!(l.contains("refused") && l.contains("condition does not parse") && l.contains("stage `a`"), "{l}");
    ev(&mut p, 10, "a");
    ev(&mut p, 11, "c");
    ev(&mut p, 12, "x");
    assert_eq!(rule_ids(&out.take()), vec!["a_then_b@v2"]);

    // An older or equal version with other content is refused.
    rule(&rules, "a.json", A_V1);
    p.poll_rules().unwrap();
    assert!(log.take().contains("not newer than the running version 2"));

    // The same version with other content is refused too: changes need a new version.
    rule(&rules, "a.json", &A_V2.replace("kind = 'c'", "kind = 'd'"));
    p.poll_rules().unwrap();
    assert!(log.take().contains("changed but its version is still 2"));

    // Deleting a file removes its rule.
    std::fs::remove_file(rules.join("b.json")).unwrap();
    p.poll_rules().unwrap();
    assert!(log.take().contains("rule `two_bs` removed"));
    ev(&mut p, 13, "b");
    ev(&mut p, 14, "b");
    p.finish().unwrap();
    assert!(rule_ids(&out.text()).is_empty());
}

#[test]
fn bad_lines_are_rejected_with_reasons_and_late_events_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    rule(&rules, "a.json", A_V1);
    let mut s = settings();
    s.engine.default_source.out_of_orderness_ms = 5;
    let out = Shared::default();
    let mut p = Pipeline::new(
        &s,
        "clicks",
        &rules,
        Arc::new(ManualClock::new(0)),
        Box::new(out.clone()),
        tmp.path().join("late.jsonl"),
        tmp.path().join("rejected.jsonl"),
        Box::new(Shared::default()),
    )
    .unwrap();
    p.line("in.jsonl", 1, r#"{"t":10,"user":"u1","kind":"a"}"#).unwrap();
    p.line("in.jsonl", 2, "not json").unwrap();
    p.line("in.jsonl", 3, r#"{"user":"u1","kind":"b"}"#).unwrap();
    p.line("in.jsonl", 4, r#"{"t":30,"user":"u1","kind":"x"}"#).unwrap();
    p.line("in.jsonl", 5, r#"{"t":12,"user":"u1","kind":"b"}"#).unwrap();
    p.line("in.jsonl", 6, r#"{"t":31,"kind":"a"}"#).unwrap();
    p.finish().unwrap();
    let rejected = std::fs::read_to_string(tmp.path().join("rejected.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = rejected.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[2]["reason"].as_str().unwrap().contains("missing key field `user`"), "{}", lines[2]);
    assert_eq!(lines[0]["line"], 2);
    assert!(lines[0]["reason"].as_str().unwrap().contains("not a JSON object"));
    assert_eq!(lines[1]["line"], 3);
    assert!(lines[1]["reason"].as_str().unwrap().contains("missing time field `t`"));
    let late = std::fs::read_to_string(tmp.path().join("late.jsonl")).unwrap();
    let l: serde_json::Value = serde_json::from_str(late.trim()).unwrap();
    assert_eq!(l["event_time"], 12);
    assert_eq!(l["watermark"], 25);
    assert_eq!(l["event"]["kind"], "b");
    // The late b was not matched.
    assert!(out.text().is_empty());
    assert_eq!((p.late.count, p.rejected.count), (1, 3));
}
