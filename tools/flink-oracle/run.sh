#!/bin/sh
# Usage: tools/flink-oracle/run.sh IN_DIR OUT_DIR  (see README.md: needs Java 17 and FLINK_LIB)
set -e
here=$(cd "$(dirname "$0")" && pwd)
lib=${FLINK_LIB:?set FLINK_LIB to the lib folder of the apache-flink-libraries wheel (pyflink/lib)}
cp="$lib/flink-cep-2.3.0.jar:$lib/flink-dist-2.3.0.jar:$lib/log4j-api-2.25.3.jar:$lib/log4j-core-2.25.3.jar:$lib/log4j-slf4j-impl-2.25.3.jar"
classes=${TMPDIR:-/tmp}/cepheid-flink-oracle
mkdir -p "$classes"
javac -nowarn -d "$classes" -cp "$cp" "$here/Oracle.java" 2>&1 | grep -v '^Note:' || true
exec java -cp "$classes:$cp" Oracle "$1" "$2" 2>&1 | grep -v 'StatusLogger\|^SLF4J'
