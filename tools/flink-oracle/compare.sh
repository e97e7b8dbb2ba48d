#!/bin/sh
# Usage: tools/flink-oracle/compare.sh [COUNT] [SEED] — random cases, Flink's results, `cepheid test` on them.
set -e
here=$(cd "$(dirname "$0")" && pwd)
count=${1:-1000}
seed=${2:-1}
work=${TMPDIR:-/tmp}/cepheid-oracle-$seed
rm -rf "$work" && mkdir -p "$work"
python3 "$here/gen.py" "$work/drawn" "$count" "$seed"
"$here/run.sh" "$work/drawn" "$work/cases" | tail -n 1
cepheid=${CEPHEID:-$here/../../target/release/cepheid}
"$cepheid" test "$work/cases"
