//! The committed sample (`samples/clickstream.jsonl`) is exactly what the
//! generator produces with the parameters below — the README's demo data is
//! reproducible, not hand-edited.

use cepheid_loadtest::clickstream::{generate, Params};

/// `gen-clickstream --events 12000 --users 400 --products 300 --seed 7 --late 0.0005 --malformed 2`
pub fn sample_params() -> Params {
    Params { events: 12_000, users: 400, products: 300, seed: 7, late: 0.0005, malformed: 2, ..Params::default() }
}

#[test]
fn committed_sample_is_generator_output() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/clickstream.jsonl");
    let committed = std::fs::read_to_string(&path).unwrap();
    let generated = generate(&sample_params()).join("\n") + "\n";
    assert!(
        committed == generated,
        "samples/clickstream.jsonl differs from the generator's output; regenerate it with: \
         cargo run --release -p cepheid-loadtest --bin gen-clickstream -- --events 12000 --users 400 --products 300 --seed 7 --late 0.0005 --malformed 2 --out samples/clickstream.jsonl"
    );
}
