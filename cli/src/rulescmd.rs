//! `cepheid rules ...`: the rules the cluster runs, in Redis. Every rule is
//! validated (parsed and compiled) before anything is stored.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cepheid_state::rules::RedisRuleStore;
use clap::Subcommand;

use crate::rulesdir::{read_rule_file, rule_files};
use crate::settings::Settings;

#[derive(Subcommand, Debug)]
pub enum RulesCmd {
    /// Validate and store rule files (a directory means every rule file in it).
    Apply {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Configuration file (Redis URL and prefix).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List the stored rules.
    List {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a stored rule (its latest version).
    Get {
        id: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Store the next version of a rule with `enabled: false`.
    Disable {
        id: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Remove a rule (its history and version numbers are kept).
    Delete {
        id: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub fn run(cmd: RulesCmd) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run_async(cmd))
}

async fn store(config: &Option<PathBuf>) -> anyhow::Result<RedisRuleStore> {
    let s = Settings::load(config.as_deref())?;
    RedisRuleStore::connect(&s.redis.url, &s.redis.prefix)
        .await
        .with_context(|| format!("connecting to Redis at {}", s.redis.url))
}

async fn run_async(cmd: RulesCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        RulesCmd::Apply { paths, config } => {
            let mut files = Vec::new();
            for p in &paths {
                if p.is_dir() {
                    files.extend(rule_files(p)?);
                } else {
                    anyhow::ensure!(p.exists(), "{} does not exist", p.display());
                    files.push(p.clone());
                }
            }
            // Validate everything first: a broken file stores nothing.
            let mut specs = Vec::new();
            let mut bad = 0;
            for f in &files {
                let checked = read_rule_file(f).and_then(|spec| {
                    let mut reg = cepheid_types::FieldRegistry::new();
                    cepheid_rules::compile(&spec, &mut reg).map(|_| spec).map_err(|d| d.to_string())
                });
                match checked {
                    Ok(spec) => specs.push((f.clone(), spec)),
                    Err(e) => {
                        bad += 1;
                        println!("invalid  {}\n{}", f.display(), crate::indent(&e));
                    }
                }
            }
            if bad > 0 {
                println!("nothing stored: {bad} invalid file(s)");
                return Ok(ExitCode::from(1));
            }
            let store = store(&config).await?;
            let mut refused = 0;
            for (f, spec) in specs {
                match store.apply(&spec).await {
                    Ok(_) => println!("stored   {} (rule `{}` version {})", f.display(), spec.id, spec.version),
                    Err(cepheid_state::StateError::Refused(m)) => {
                        refused += 1;
                        println!("refused  {}: {m}", f.display());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(if refused == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        RulesCmd::List { config } => {
            let (rules, _) = store(&config).await?.list().await?;
            println!("{:<40} {:>7}  {:<8} NAME", "ID", "VERSION", "ENABLED");
            for r in rules {
                println!("{:<40} {:>7}  {:<8} {}", r.id, r.version, r.enabled, r.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        RulesCmd::Get { id, config } => match store(&config).await?.get(&id).await? {
            Some(r) => {
                println!("{}", serde_json::to_string_pretty(&r.document)?);
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("rule `{id}` does not exist");
                Ok(ExitCode::from(1))
            }
        },
        RulesCmd::Disable { id, config } => {
            let r = store(&config).await?.disable(&id).await?;
            println!("rule `{id}` disabled (version {})", r.version);
            Ok(ExitCode::SUCCESS)
        }
        RulesCmd::Delete { id, config } => {
            store(&config).await?.delete(&id).await?;
            println!("rule `{id}` deleted");
            Ok(ExitCode::SUCCESS)
        }
    }
}
