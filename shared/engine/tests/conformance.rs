//! Every conformance case (Flink's own CEP tests, the extensions, and the
//! random Flink-checked suite) must pass. The cases are data, copied into the
//! repository under `tests/` (refresh them from the material handed to the
//! project when it changes).

use std::path::PathBuf;

use cepheid_engine::testcase::{collect_case_files, TestCase};

fn run_dir(dir: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests").join(dir);
    let root = root.canonicalize().unwrap_or(root);
    let files = collect_case_files(std::slice::from_ref(&root)).expect("case directory");
    assert!(!files.is_empty(), "no cases in {}", root.display());
    let mut failed = Vec::new();
    for f in &files {
        let case = TestCase::load(f).unwrap_or_else(|e| panic!("{e}"));
        let out = case.run();
        if !out.passed() {
            failed.push(format!("FAIL {} ({})\n  {}", out.name, f.display(), out.failures.join("\n  ")));
        }
    }
    if !failed.is_empty() {
        panic!("{} of {} cases failed:\n{}", failed.len(), files.len(), failed.join("\n"));
    }
}

#[test]
fn flink_and_extension_cases() {
    run_dir("conformance");
}

#[test]
fn random_flink_cases() {
    run_dir("conformance-random");
}

/// Random cases drawn by `tools/flink-oracle`, Flink 2.3's results.
#[test]
fn oracle_flink_cases() {
    run_dir("conformance-oracle");
}

/// Cepheid's own cases: where the spec parts from Flink, and rules found by
/// `tools/flink-oracle` (Flink's results where it gives one).
#[test]
fn cepheid_cases() {
    run_dir("cepheid");
}

#[test]
fn example_rule_tests() {
    run_dir("../rules/examples/tests");
}

/// The copy under `tests/` must equal the cases handed to the project when
/// they are present beside the repository (`../shared`); a fresh clone has
/// no `../shared` and uses the copy as is.
#[test]
fn shared_cases_in_sync() {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shared = std::env::var_os("CEPHEID_SHARED").map(PathBuf::from).unwrap_or_else(|| here.join("../shared"));
    for d in ["conformance", "conformance-random"] {
        let src = shared.join(d);
        if !src.is_dir() {
            continue;
        }
        let list = |p: &PathBuf| {
            let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(p)
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
                .collect();
            v.sort();
            v
        };
        assert!(
            list(&src) == list(&here.join("tests").join(d)),
            "tests/{d} differs from {}: run scripts/sync-shared-cases.sh",
            src.display()
        );
    }
}

#[test]
fn cepheid_own_cases() {
    run_dir("cepheid");
}
