#!/usr/bin/env bash
# Copies the conformance cases handed to the project (../shared beside the
# repository) into tests/, where the test suite reads them. Run it whenever
# ../shared changes; the test `shared_cases_in_sync` fails until you do.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
shared="${CEPHEID_SHARED:-$here/../shared}"
for d in conformance conformance-random; do
  [ -d "$shared/$d" ] || { echo "no $shared/$d" >&2; exit 1; }
  rm -rf "$here/tests/$d"
  mkdir -p "$here/tests/$d"
  cp "$shared/$d"/* "$here/tests/$d/"
  echo "copied $(ls "$here/tests/$d" | wc -l) files into tests/$d"
done
