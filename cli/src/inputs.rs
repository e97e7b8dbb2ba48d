//! `cepheid run`'s inputs. Each `--events` argument is a JSON-lines file, `-`
//! (standard input), or `SOURCE=FILE` — the events of another source, e.g.
//! `orders=orders.jsonl` beside the clickstream. One source's files are read
//! one after another; different sources are merged by event time (the next
//! line taken is always the one with the earliest event time among the
//! sources), so that no source runs ahead of another and every source's
//! watermark moves with the others', as events of several topics do in the
//! cluster.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

/// One `--events` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub source: Arc<str>,
    /// A path, or `-` for standard input.
    pub name: String,
}

/// Reads an `--events` argument: `FILE`, `-`, or `SOURCE=FILE` (a file whose
/// own name holds `=` is still a file when it exists).
pub fn parse(arg: &str, default_source: &str) -> anyhow::Result<Input> {
    if arg == "-" || Path::new(arg).is_file() {
        return Ok(Input { source: default_source.into(), name: arg.to_string() });
    }
    if let Some((source, file)) = arg.split_once('=') {
        anyhow::ensure!(
            !source.is_empty() && source.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)),
            "--events {arg:?}: {source:?} is not a source name (letters, digits, `_`, `-`, `.`)"
        );
        anyhow::ensure!(file == "-" || Path::new(file).is_file(), "events file {file} (source `{source}`) does not exist");
        return Ok(Input { source: source.into(), name: file.to_string() });
    }
    anyhow::bail!("events file {arg} does not exist")
}

/// One input line, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub source: Arc<str>,
    /// The file's name as given (`<stdin>` for `-`).
    pub file: Arc<str>,
    pub lineno: u64,
    pub text: String,
}

/// The lines of all inputs, in the order they are fed to the engine.
pub struct Lines {
    chains: Vec<Chain>,
    merge: bool,
}

/// One source's files, read one after another.
struct Chain {
    source: Arc<str>,
    files: VecDeque<String>,
    open: Option<(Box<dyn BufRead + Send>, Arc<str>, u64)>,
    /// The next line and its event time (when merging).
    next: Option<(i64, Line)>,
    time_path: Vec<String>,
}

impl Chain {
    /// Makes `next` hold this chain's next line, unless it has none left.
    fn fill(&mut self, merge: bool) -> anyhow::Result<()> {
        while self.next.is_none() {
            if self.open.is_none() {
                let Some(name) = self.files.pop_front() else { return Ok(()) };
                let reader: Box<dyn BufRead + Send> = if name == "-" {
                    Box::new(BufReader::new(std::io::stdin()))
                } else {
                    Box::new(BufReader::with_capacity(1 << 20, File::open(&name).with_context(|| format!("cannot open {name}"))?))
                };
                let label: Arc<str> = Arc::from(if name == "-" { "<stdin>" } else { name.as_str() });
                self.open = Some((reader, label, 0));
            }
            let (reader, label, n) = self.open.as_mut().expect("opened above");
            let mut text = String::new();
            let read = reader.read_line(&mut text).with_context(|| format!("reading {label} line {}", *n + 1))?;
            if read == 0 {
                self.open = None;
                continue;
            }
            *n += 1;
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            let time = if merge { time_of(&text, &self.time_path) } else { 0 };
            self.next = Some((time, Line { source: self.source.clone(), file: label.clone(), lineno: *n, text }));
        }
        Ok(())
    }
}

/// The event time of a line for ordering only: a line without one goes
/// first (the engine rejects it with the reason).
fn time_of(text: &str, path: &[String]) -> i64 {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else { return i64::MIN };
    let mut at = &v;
    for p in path {
        match at.get(p) {
            Some(x) => at = x,
            None => return i64::MIN,
        }
    }
    at.as_i64().or_else(|| at.as_f64().map(|f| f as i64)).unwrap_or(i64::MIN)
}

impl Lines {
    /// `time_field` names each source's event time field (a dotted path).
    pub fn new(inputs: &[Input], time_field: impl Fn(&str) -> String) -> Lines {
        let mut chains: Vec<Chain> = Vec::new();
        for i in inputs {
            match chains.iter_mut().find(|c| c.source == i.source) {
                Some(c) => c.files.push_back(i.name.clone()),
                None => chains.push(Chain {
                    source: i.source.clone(),
                    files: VecDeque::from([i.name.clone()]),
                    open: None,
                    next: None,
                    time_path: time_field(&i.source).split('.').map(str::to_string).collect(),
                }),
            }
        }
        let merge = chains.len() > 1;
        Lines { chains, merge }
    }
}

impl Iterator for Lines {
    type Item = anyhow::Result<Line>;

    fn next(&mut self) -> Option<Self::Item> {
        for c in &mut self.chains {
            if let Err(e) = c.fill(self.merge) {
                return Some(Err(e));
            }
        }
        // The earliest next line; on a tie, the source named first.
        let pick = self.chains.iter().enumerate().filter_map(|(i, c)| c.next.as_ref().map(|(t, _)| (*t, i))).min()?.1;
        self.chains[pick].next.take().map(|(_, l)| Ok(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, lines: &[&str]) -> String {
        let p = dir.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn arguments_name_files_and_sources() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(dir.path(), "a.jsonl", &["{}"]);
        assert_eq!(parse(&f, "clickstream").unwrap(), Input { source: "clickstream".into(), name: f.clone() });
        assert_eq!(parse(&format!("orders={f}"), "clickstream").unwrap(), Input { source: "orders".into(), name: f.clone() });
        assert_eq!(parse("-", "clickstream").unwrap().source.as_ref(), "clickstream");
        let odd = file(dir.path(), "x=y.jsonl", &["{}"]);
        assert_eq!(parse(&odd, "clickstream").unwrap().source.as_ref(), "clickstream", "an existing file named with `=`");
        let e = parse("orders=/nowhere.jsonl", "clickstream").unwrap_err().to_string();
        assert!(e.contains("/nowhere.jsonl") && e.contains("orders"), "{e}");
        let e = parse(&format!("bad source={f}"), "clickstream").unwrap_err().to_string();
        assert!(e.contains("not a source name"), "{e}");
        assert!(parse("/nowhere.jsonl", "clickstream").unwrap_err().to_string().contains("does not exist"));
    }

    #[test]
    fn sources_are_merged_by_event_time_and_one_sources_files_read_in_turn() {
        let dir = tempfile::tempdir().unwrap();
        let c1 = file(dir.path(), "c1.jsonl", &[r#"{"t":1}"#, r#"{"t":5}"#]);
        let c2 = file(dir.path(), "c2.jsonl", &[r#"{"t":9}"#]);
        let o = file(dir.path(), "o.jsonl", &[r#"{"at":{"ms":2}}"#, "not json", r#"{"at":{"ms":7}}"#]);
        let inputs = vec![
            parse(&c1, "clicks").unwrap(),
            parse(&format!("orders={o}"), "clicks").unwrap(),
            parse(&c2, "clicks").unwrap(),
        ];
        let got: Vec<(String, u64, String)> = Lines::new(&inputs, |s| if s == "orders" { "at.ms".into() } else { "t".into() })
            .map(|l| {
                let l = l.unwrap();
                (l.source.to_string(), l.lineno, l.text)
            })
            .collect();
        let want = [
            ("clicks", 1, r#"{"t":1}"#),
            ("orders", 1, r#"{"at":{"ms":2}}"#),
            ("orders", 2, "not json"),
            ("clicks", 2, r#"{"t":5}"#),
            ("orders", 3, r#"{"at":{"ms":7}}"#),
            ("clicks", 1, r#"{"t":9}"#),
        ];
        assert_eq!(got, want.iter().map(|(s, n, t)| (s.to_string(), *n, t.to_string())).collect::<Vec<_>>());
    }

    #[test]
    fn one_source_is_read_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(dir.path(), "a.jsonl", &[r#"{"t":9}"#, r#"{"t":1}"#]);
        let got: Vec<u64> = Lines::new(&[parse(&f, "s").unwrap()], |_| "t".into()).map(|l| l.unwrap().lineno).collect();
        assert_eq!(got, vec![1, 2]);
    }
}
