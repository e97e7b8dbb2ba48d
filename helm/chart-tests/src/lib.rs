//! Tests of the Helm chart in `helm/cepheid` (see `tests/chart.rs`); no code.
