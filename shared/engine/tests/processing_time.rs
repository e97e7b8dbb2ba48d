//! Processing-time rules run on the injected clock: an event is stamped with
//! the clock when it arrives, and windows and absences fire when the clock
//! passes their deadline — no sleeping, the test moves the clock.

use std::sync::Arc;

use cepheid_engine::engine::{Engine, EngineConfig, ManualClock, Output};
use cepheid_rules::parse_rule_json;

#[test]
fn absence_fires_by_the_clock() {
    let clock = ManualClock::new(1_000);
    let mut e = Engine::new(EngineConfig::default(), Arc::new(clock.clone()));
    let rule = r#"{"id":"unanswered","version":1,"time":"processing","key_by":"session",
        "pattern":[{"name":"q","where":"sender = 'customer'"},{"name":"r","where":"sender = 'agent'","negate":true}],
        "within":"5s"}"#;
    e.upsert_rule(&parse_rule_json(rule).unwrap()).unwrap();
    let mut out = Vec::new();
    // Event times are irrelevant (and far in the past) for a processing-time rule.
    for (session, sender) in [("s1", "customer"), ("s2", "customer")] {
        let ev = e.decode("cs", &format!(r#"{{"eventTime":5,"session":"{session}","sender":"{sender}"}}"#)).unwrap();
        e.push("cs", ev, &mut out);
    }
    clock.advance(2_000);
    let ev = e.decode("cs", r#"{"eventTime":6,"session":"s2","sender":"agent"}"#).unwrap();
    e.push("cs", ev, &mut out);
    clock.set(5_999);
    e.tick(&mut out);
    assert!(out.iter().all(|o| !matches!(o, Output::Match(_))), "nothing before the deadline");
    clock.set(6_000);
    e.tick(&mut out);
    let matches: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Match(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(matches.len(), 1);
    assert_eq!(matches[0].key["session"], "s1");
    assert_eq!(matches[0].detected_at, 6_000);
}
