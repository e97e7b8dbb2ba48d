//! `cepheid test`: rule unit tests, like `promtool test rules`.

use std::path::PathBuf;
use std::process::ExitCode;

use cepheid_engine::testcase::{collect_case_files, TestCase};

#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Case files or directories of them (every *.json inside).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Also list the cases that passed.
    #[arg(long, short)]
    pub verbose: bool,
}

/// Runs the cases; the last line is `N passed, M failed`.
pub fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let (report, failed) = run_cases(&args.paths, args.verbose)?;
    print!("{report}");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The report text and the number of failed cases.
pub fn run_cases(paths: &[PathBuf], verbose: bool) -> anyhow::Result<(String, usize)> {
    for p in paths {
        anyhow::ensure!(p.exists(), "{} does not exist", p.display());
    }
    let files = collect_case_files(paths)?;
    let mut out = String::new();
    let (mut passed, mut failed) = (0usize, 0usize);
    for f in &files {
        match TestCase::load(f) {
            Ok(case) => {
                let r = case.run();
                if r.passed() {
                    passed += 1;
                    if verbose {
                        out.push_str(&format!("ok    {}\n", r.name));
                    }
                } else {
                    failed += 1;
                    out.push_str(&format!("FAIL  {} ({})\n", r.name, f.display()));
                    for fl in &r.failures {
                        out.push_str(&crate::indent(fl));
                        out.push('\n');
                    }
                }
            }
            Err(e) => {
                failed += 1;
                out.push_str(&format!("FAIL  {}\n  {e}\n", f.display()));
            }
        }
    }
    out.push_str(&format!("{passed} passed, {failed} failed\n"));
    Ok((out, failed))
}
