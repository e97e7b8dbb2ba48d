//! Writes a generated clickstream as JSON lines.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufWriter, Write};

use cepheid_loadtest::clickstream::{generate, Params};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Generate a realistic e-commerce clickstream (JSON lines)")]
struct Args {
    /// Number of events.
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    #[arg(long, default_value_t = 5_000)]
    products: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Events per second of simulated event time.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Fraction of events delivered up to 1.5 s out of order.
    #[arg(long, default_value_t = 0.01)]
    reorder: f64,
    /// Fraction of events delivered 3–10 s late.
    #[arg(long, default_value_t = 0.0)]
    late: f64,
    /// Malformed lines to mix in.
    #[arg(long, default_value_t = 0)]
    malformed: usize,
    /// Output file (standard output by default).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let p = Params {
        events: a.events,
        users: a.users,
        products: a.products,
        seed: a.seed,
        rate: a.rate,
        reorder: a.reorder,
        late: a.late,
        malformed: a.malformed,
        ..Params::default()
    };
    let lines = generate(&p);
    let mut w: Box<dyn Write> = match a.out {
        Some(f) => Box::new(BufWriter::new(std::fs::File::create(f)?)),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    for l in lines {
        w.write_all(l.as_bytes())?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}
