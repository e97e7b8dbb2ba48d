//! Every conformance case (Flink's own CEP tests, the extensions, and the
//! random Flink-checked suite) must pass. The cases are data, copied into the
//! repository under `tests/` (refresh them from the material handed to the
//! project when it changes).

use std::path::PathBuf;

use cepheid_engine::testcase::{collect_case_files, TestCase};

fn run_dir(dir: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests").join(dir);
    let files = collect_case_files(&[root.clone()]).expect("case directory");
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
