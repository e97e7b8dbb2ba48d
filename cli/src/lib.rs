//! The `cepheid` command line: `run` (the whole pipeline in one process on
//! the embedded defaults), `test` (rule test cases), `validate` (rule files).
//! Everything is a library function so tests call it in-process.

pub mod inputs;
pub mod rulescmd;
pub mod rulesdir;
pub mod run;
pub mod settings;
pub mod test;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cepheid", version, about = "Cepheid: a real-time, dynamic complex-event-processing rules engine")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Match every rule of a directory over JSON-lines events, in one process.
    Run(run::RunArgs),
    /// Run rule test cases (a directory means every *.json in it).
    Test(test::TestArgs),
    /// Manage the rules stored in Redis that the cluster runs.
    #[command(subcommand)]
    Rules(rulescmd::RulesCmd),
    /// Check rule files and print every problem found.
    Validate {
        /// Rule files (.json, .yaml, .yml) or directories of them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

pub fn main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args).map(|_| ExitCode::SUCCESS),
        Command::Test(args) => test::test(args),
        Command::Rules(cmd) => rulescmd::run(cmd),
        Command::Validate { paths } => validate(&paths),
    }
}

fn validate(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(rulesdir::rule_files(p)?);
        } else {
            files.push(p.clone());
        }
    }
    let mut bad = 0;
    for f in &files {
        match rulesdir::read_rule_file(f) {
            Ok(spec) => {
                let mut reg = cepheid_types::FieldRegistry::new();
                match cepheid_rules::compile(&spec, &mut reg) {
                    Ok(_) => println!("ok    {} (rule `{}` version {})", f.display(), spec.id, spec.version),
                    Err(d) => {
                        bad += 1;
                        println!("FAIL  {}\n{}", f.display(), indent(&d.to_string()));
                    }
                }
            }
            Err(e) => {
                bad += 1;
                println!("FAIL  {}\n{}", f.display(), indent(&e));
            }
        }
    }
    println!("{} valid, {} invalid", files.len() - bad, bad);
    Ok(if bad == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub(crate) fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}
