//! `cepheid run`: the whole pipeline in one process — read JSON-lines events,
//! match every rule of a directory (applying rule changes while running),
//! write match records, late and rejected events, progress and a summary.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cepheid_engine::engine::{Clock, Engine, Output, RuleChange, SourceConfig, SystemClock};
use cepheid_rules::parse_duration;

use crate::rulesdir::{Change, RulesDir};
use crate::settings::Settings;

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Directory of rule files (.json, .yaml); watched for changes while running.
    #[arg(long)]
    pub rules: PathBuf,
    /// JSON-lines event files; `-` reads standard input; `SOURCE=FILE` reads
    /// another source's events (e.g. `orders=orders.jsonl`). One source's files
    /// are read in order; different sources are merged by event time.
    #[arg(long, num_args = 1.., required = true)]
    pub events: Vec<String>,
    /// Where match records go (JSON lines); standard output by default.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where late events go, with the watermark they missed [default: late.jsonl, created only if needed].
    #[arg(long)]
    pub late: Option<PathBuf>,
    /// Where rejected lines go, with the reason [default: rejected.jsonl, created only if needed].
    #[arg(long)]
    pub rejected: Option<PathBuf>,
    /// Configuration file layered over the defaults (see config/default.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Source name of the events of files given without one [default: from config, `clickstream`].
    #[arg(long)]
    pub source: Option<String>,
    /// Event time field of that source [default: from config, `eventTime`].
    #[arg(long)]
    pub time_field: Option<String>,
    /// Bounded out-of-orderness of that source, e.g. `2s` [default: from config, 2s].
    #[arg(long)]
    pub out_of_orderness: Option<String>,
    /// No progress line and no summary on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Also deliver alerts to the targets of each rule's `action` (see [notifier] in the configuration).
    #[arg(long)]
    pub notify: bool,
}

/// The notifier stage of the embedded pipeline (its own small runtime).
pub struct NotifyStage {
    rt: tokio::runtime::Runtime,
    notifier: cepheid_notify::Notifier,
    refused: std::collections::HashSet<String>,
    /// Submissions not yet handed to the target queues.
    inflight: Vec<tokio::task::JoinHandle<()>>,
}

impl NotifyStage {
    /// `kafka` is needed only when a target is `kind = "kafka"`: alerts then go
    /// to that real broker (never to an in-memory bus nobody reads).
    pub fn start(cfg: cepheid_notify::NotifierConfig, kafka: Option<&cepheid_runtime::KafkaSettings>) -> anyhow::Result<NotifyStage> {
        let wants_kafka = cfg.targets.values().any(|t| matches!(t, cepheid_notify::TargetConfig::Kafka { .. }));
        let bus = match (wants_kafka, kafka) {
            (false, _) => None,
            (true, Some(k)) => Some(k.bus()?),
            (true, None) => anyhow::bail!("a notifier target has kind \"kafka\", but no [kafka] bootstrap is configured"),
        };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let notifier = rt.block_on(async {
            cepheid_notify::Notifier::start(
                cfg,
                cepheid_notify::NotifierDeps {
                    clock: Arc::new(cepheid_types::SystemClock),
                    sleeper: Arc::new(cepheid_notify::TokioSleeper),
                    store: cepheid_notify::stores::Store::memory(),
                    seed: std::process::id() as u64,
                    bus,
                },
            )
            .await
        })?;
        Ok(NotifyStage { rt, notifier, refused: Default::default(), inflight: Vec::new() })
    }

    fn submit(&mut self, r: &cepheid_types::MatchRecord, spec: &cepheid_rules::RuleSpec, log: &mut dyn Write) {
        let Some(action) = spec.action.clone() else { return };
        if action.targets.is_empty() {
            return;
        }
        // A target that is not configured gets the alert in the dead letter
        // (the notifier does that); said here once per rule and target.
        for t in &action.targets {
            if let Err(e) = self.notifier.resolve(t) {
                if self.refused.insert(format!("{}/{t}", spec.id)) {
                    let _ = writeln!(log, "rule `{}`: alerts not delivered to `{t}` (dead-lettered): {e}", spec.id);
                }
            }
        }
        let (n, r, name) = (self.notifier.clone(), r.clone(), spec.name.clone());
        if self.inflight.len() > 1024 {
            self.inflight.retain(|h| !h.is_finished());
        }
        self.inflight.push(self.rt.spawn(async move {
            if let Err(e) = n.submit(&r, &name, &action).await {
                eprintln!("notifier: {e}");
            }
        }));
    }

    fn tick(&self) {
        let n = self.notifier.clone();
        self.rt.spawn(async move {
            let _ = n.poll_delayed().await;
        });
    }

    /// Waits (at most `limit`) for queued alerts to be delivered.
    fn finish(&mut self, limit: Duration) -> cepheid_notify::Metrics {
        let n = self.notifier.clone();
        let inflight = std::mem::take(&mut self.inflight);
        self.rt.block_on(async move {
            let _ = tokio::time::timeout(limit, async {
                for h in inflight {
                    let _ = h.await;
                }
                let _ = n.poll_delayed().await;
                n.idle().await
            })
            .await;
        });
        self.notifier.metrics()
    }
}

/// A sink opened on first use, so no empty late/rejected files appear.
pub struct LazyFile {
    path: PathBuf,
    w: Option<BufWriter<File>>,
    pub count: u64,
}

impl LazyFile {
    pub fn new(path: PathBuf) -> Self {
        LazyFile { path, w: None, count: 0 }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        if self.w.is_none() {
            self.w = Some(BufWriter::new(File::create(&self.path)?));
        }
        self.count += 1;
        let w = self.w.as_mut().unwrap();
        w.write_all(line.as_bytes())?;
        w.write_all(b"\n")
    }
    pub fn flush(&mut self) -> std::io::Result<()> {
        if let Some(w) = &mut self.w {
            w.flush()?;
        }
        Ok(())
    }
}

/// The embedded pipeline, driven line by line (tests call it directly).
pub struct Pipeline {
    pub engine: Engine,
    rules: RulesDir,
    source: String,
    out: Box<dyn Write + Send>,
    pub late: LazyFile,
    pub rejected: LazyFile,
    log: Box<dyn Write + Send>,
    outputs: Vec<Output>,
    pub lines: u64,
    pub notify: Option<NotifyStage>,
}

impl Pipeline {
    /// The pipeline's settings, source, rules and clock, and where each of its outputs goes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: &Settings,
        source: &str,
        rules_dir: &Path,
        clock: Arc<dyn Clock>,
        out: Box<dyn Write + Send>,
        late: PathBuf,
        rejected: PathBuf,
        log: Box<dyn Write + Send>,
    ) -> anyhow::Result<Pipeline> {
        anyhow::ensure!(rules_dir.is_dir(), "rules directory {} does not exist", rules_dir.display());
        let engine = Engine::new(settings.engine.clone(), clock);
        let mut p = Pipeline {
            engine,
            rules: RulesDir::new(rules_dir),
            source: source.to_string(),
            out,
            late: LazyFile::new(late),
            rejected: LazyFile::new(rejected),
            log,
            outputs: Vec::new(),
            lines: 0,
            notify: None,
        };
        p.poll_rules()?;
        Ok(p)
    }

    /// Applies rule files added, changed or deleted since the last poll.
    pub fn poll_rules(&mut self) -> anyhow::Result<()> {
        let changes = self.rules.poll().with_context(|| format!("reading rules directory {}", self.rules.dir().display()))?;
        for c in changes {
            let msg = match c {
                Change::Upsert { file, spec } => match self.engine.upsert_rule(&spec) {
                    Ok(RuleChange::Added { id, version }) => format!("rule `{id}` version {version} loaded from {}", file.display()),
                    Ok(RuleChange::Replaced { id, old_version, version }) => {
                        format!("rule `{id}` version {old_version} replaced by version {version} (its partial matches start afresh)")
                    }
                    Err(cepheid_engine::engine::EngineError::StaleVersion { id, running, offered }) if offered == running => {
                        // Same version: unchanged content is fine (touch, re-save); changed content is refused.
                        if self.engine.rule_spec(&id).is_some_and(|r| r.document == spec.document) {
                            continue;
                        }
                        format!(
                            "rule file {} refused: rule `{id}` changed but its version is still {running}; raise the version to apply the change (version {running} keeps running)",
                            file.display()
                        )
                    }
                    Err(e) => format!("rule file {} refused; the running version (if any) keeps running:\n{}", file.display(), crate::indent(&e.to_string())),
                },
                Change::Removed { file, id } => {
                    self.engine.remove_rule(&id);
                    format!("rule `{id}` removed ({} deleted)", file.display())
                }
                Change::Refused { file, reason } => {
                    format!("rule file {} refused; the running version (if any) keeps running:\n{}", file.display(), crate::indent(&reason))
                }
            };
            writeln!(self.log, "{msg}")?;
        }
        Ok(())
    }

    /// One input line of the pipeline's source (`file` and `lineno` name it in rejections).
    pub fn line(&mut self, file: &str, lineno: u64, text: &str) -> anyhow::Result<()> {
        let source = std::mem::take(&mut self.source);
        let r = self.line_of(&source, file, lineno, text);
        self.source = source;
        r
    }

    /// One input line of `source`.
    pub fn line_of(&mut self, source: &str, file: &str, lineno: u64, text: &str) -> anyhow::Result<()> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        self.lines += 1;
        match self.engine.decode(source, text) {
            Ok(ev) => self.engine.push(source, ev, &mut self.outputs),
            Err(e) => {
                let rec = serde_json::json!({"reason": e.to_string(), "source": source, "file": file, "line": lineno, "text": text});
                self.rejected.write_line(&rec.to_string())?;
            }
        }
        self.drain()
    }

    /// Processing-time progress (no input needed).
    pub fn tick(&mut self) -> anyhow::Result<()> {
        self.engine.tick(&mut self.outputs);
        if let Some(n) = &self.notify {
            n.tick();
        }
        self.drain()
    }

    /// End of input: the watermark goes to +∞, windows and absences fire.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        self.engine.finish(&mut self.outputs);
        self.drain()?;
        if let Some(n) = &mut self.notify {
            let m = n.finish(Duration::from_secs(30));
            for (target, tm) in m.iter().filter(|(_, tm)| tm.attempts + tm.deduplicated > 0) {
                writeln!(
                    self.log,
                    "  notifier target {target}: sent {}, retried {}, failed {}, dead-lettered {}, deduplicated {}",
                    tm.sent, tm.retried, tm.failed, tm.dead_lettered, tm.deduplicated
                )?;
            }
        }
        self.flush()
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.out.flush()?;
        self.late.flush()?;
        self.rejected.flush()?;
        self.log.flush()?;
        Ok(())
    }

    fn drain(&mut self) -> anyhow::Result<()> {
        for o in self.outputs.drain(..) {
            match o {
                Output::Match(r) => {
                    self.out.write_all(r.to_json_line().as_bytes())?;
                    self.out.write_all(b"\n")?;
                    if let Some(n) = &mut self.notify {
                        if let Some(spec) = self.engine.rule_spec(&r.rule_id) {
                            n.submit(&r, spec, &mut self.log);
                        }
                    }
                }
                Output::MissingKey { event, rule, field } => {
                    let rec = format!(
                        "{{\"reason\":{},\"source\":{},\"event\":{}}}",
                        serde_json::to_string(&format!("missing key field `{field}` (rule `{rule}` keys by it; no rule could use the event)"))?,
                        serde_json::to_string(&self.source)?,
                        event.raw()
                    );
                    self.rejected.write_line(&rec)?;
                }
                Output::Late { source, event, watermark } => {
                    let rec = format!(
                        "{{\"reason\":\"late: event time {} is behind the watermark {}\",\"source\":{},\"event_time\":{},\"watermark\":{},\"event\":{}}}",
                        event.time(),
                        watermark,
                        serde_json::to_string(&source)?,
                        event.time(),
                        watermark,
                        event.raw()
                    );
                    self.late.write_line(&rec)?;
                }
            }
        }
        Ok(())
    }

    /// The summary printed at the end.
    pub fn summary(&self, elapsed: Duration) -> String {
        let st = self.engine.stats();
        let secs = elapsed.as_secs_f64().max(1e-9);
        let mut s = format!(
            "cepheid run: {} events in {:.2} s ({:.0} events/s), {} matches, {} timeouts\n",
            self.lines,
            secs,
            self.lines as f64 / secs,
            st.matches,
            st.timeouts
        );
        for (id, n) in self.engine.matches_per_rule() {
            s.push_str(&format!("  {id:<40} {n:>8} matches\n"));
        }
        s.push_str(&format!("  late events: {}", self.late.count));
        if self.late.count > 0 {
            s.push_str(&format!(" (written to {})", self.late.path().display()));
        }
        s.push_str(&format!("\n  rejected lines: {}", self.rejected.count));
        if self.rejected.count > 0 {
            s.push_str(&format!(" (written to {})", self.rejected.path().display()));
        }
        if st.missing_key > 0 {
            s.push_str(&format!("\n  events a rule skipped for a missing key field: {}", st.missing_key));
        }
        s
    }
}

enum Msg {
    Lines(Vec<crate::inputs::Line>),
    Failed(String),
    Done,
}

/// `cepheid run`.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut settings = Settings::load(args.config.as_deref())?;
    let source = args.source.clone().unwrap_or_else(|| settings.run.source.clone());
    if args.time_field.is_some() || args.out_of_orderness.is_some() {
        let mut sc = settings.engine.sources.get(&source).cloned().unwrap_or_else(|| settings.engine.default_source.clone());
        if let Some(t) = &args.time_field {
            sc.time_field = t.clone();
        }
        if let Some(o) = &args.out_of_orderness {
            sc.out_of_orderness_ms = parse_duration(o)
                .or_else(|| o.parse().ok())
                .with_context(|| format!("--out-of-orderness {o:?} is not a duration such as 2s or 500ms"))?;
        }
        settings.engine.sources.insert(source.clone(), SourceConfig { ..sc });
    }
    let out: Box<dyn Write + Send> = match &args.out {
        Some(p) => Box::new(BufWriter::new(File::create(p).with_context(|| format!("creating {}", p.display()))?)),
        None => Box::new(BufWriter::new(std::io::stdout())),
    };
    let mut p = Pipeline::new(
        &settings,
        &source,
        &args.rules,
        Arc::new(SystemClock),
        out,
        args.late.clone().unwrap_or_else(|| "late.jsonl".into()),
        args.rejected.clone().unwrap_or_else(|| "rejected.jsonl".into()),
        Box::new(std::io::stderr()),
    )?;
    let inputs: Vec<crate::inputs::Input> = args.events.iter().map(|e| crate::inputs::parse(e, &source)).collect::<anyhow::Result<_>>()?;
    let time_fields: std::collections::HashMap<Arc<str>, String> = inputs
        .iter()
        .map(|i| {
            let sc = settings.engine.sources.get(i.source.as_ref()).unwrap_or(&settings.engine.default_source);
            (i.source.clone(), sc.time_field.clone())
        })
        .collect();
    if args.notify {
        p.notify = Some(NotifyStage::start(settings.notifier.clone(), settings.kafka.as_ref())?);
    }

    // Inputs are read on their own thread so that rule changes and
    // processing-time deadlines are applied while input blocks (stdin).
    let (tx, rx) = mpsc::sync_channel::<Msg>(64);
    let from_stdin = inputs.iter().any(|i| i.name == "-");
    std::thread::spawn(move || {
        let mut batch = Vec::with_capacity(1024);
        for line in crate::inputs::Lines::new(&inputs, |s| time_fields.get(s).cloned().unwrap_or_default()) {
            match line {
                Ok(l) => batch.push(l),
                Err(e) => {
                    let _ = tx.send(Msg::Failed(format!("{e:#}")));
                    return;
                }
            }
            // From a terminal or pipe, hand lines over at once; from files, in batches.
            if (batch.len() >= 1024 || from_stdin) && tx.send(Msg::Lines(std::mem::replace(&mut batch, Vec::with_capacity(1024)))).is_err() {
                return;
            }
        }
        if !batch.is_empty() && tx.send(Msg::Lines(batch)).is_err() {
            return;
        }
        let _ = tx.send(Msg::Done);
    });

    let started = Instant::now();
    let poll = Duration::from_millis(settings.run.rules_poll_ms.max(50));
    let progress_every = Duration::from_millis(settings.run.progress_interval_ms.max(100));
    let (mut last_poll, mut last_progress) = (Instant::now(), Instant::now());
    loop {
        match rx.recv_timeout(poll) {
            Ok(Msg::Lines(lines)) => {
                for l in &lines {
                    p.line_of(&l.source, &l.file, l.lineno, &l.text)?;
                }
                if from_stdin {
                    p.flush()?;
                }
            }
            Ok(Msg::Failed(e)) => anyhow::bail!(e),
            Ok(Msg::Done) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if last_poll.elapsed() >= poll {
            p.poll_rules()?;
            p.tick()?;
            last_poll = Instant::now();
        }
        if !args.quiet && last_progress.elapsed() >= progress_every {
            let secs = started.elapsed().as_secs_f64();
            let (partial, keys) = p.engine.state_size();
            eprintln!(
                "… {} events, {} matches, {:.0} events/s, {} partial matches over {} keys",
                p.lines,
                p.engine.stats().matches,
                p.lines as f64 / secs,
                partial,
                keys
            );
            last_progress = Instant::now();
        }
    }
    p.finish()?;
    if !args.quiet {
        eprintln!("{}", p.summary(started.elapsed()));
    }
    Ok(())
}
