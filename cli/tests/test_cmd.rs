//! `cepheid test`: a readable report of failing cases, `N passed, M failed`
//! as the last line, and a failing exit status when any case fails.

use std::process::Command;

#[test]
fn reports_failures_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let rule = r#"{"id":"t","version":1,"pattern":[{"name":"a","where":"name = 'a'"},{"name":"b","where":"name = 'b'"}]}"#;
    let events = r#"[{"id":1,"name":"a","event_time":1},{"id":2,"name":"b","event_time":2}]"#;
    std::fs::write(dir.path().join("ok.json"), format!(r#"{{"name":"passes","rule":{rule},"events":{events},"expected":[{{"a":[1],"b":[2]}}]}}"#)).unwrap();
    std::fs::write(dir.path().join("bad.json"), format!(r#"{{"name":"fails","rule":{rule},"events":{events},"expected":[{{"a":[1],"b":[3]}}]}}"#)).unwrap();
    std::fs::write(
        dir.path().join("err.json"),
        r#"{"name":"refused rule","rule":{"id":"t","version":1,"pattern":[{"name":"a","negate":true}]},"events":[],"expected_error":"first stage"}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cepheid")).arg("test").arg(dir.path()).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(text.lines().last().unwrap(), "2 passed, 1 failed");
    assert!(text.contains("FAIL  fails"), "{text}");
    assert!(text.contains("missing     {a: [1], b: [3]}"), "{text}");
    assert!(text.contains("unexpected  {a: [1], b: [2]}"), "{text}");

    std::fs::remove_file(dir.path().join("bad.json")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cepheid")).arg("test").arg(dir.path()).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().last().unwrap(), "2 passed, 0 failed");
}
