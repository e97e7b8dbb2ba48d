#!/usr/bin/env bash
# The cluster on one machine: a Kafka-protocol broker (tansu), ingest,
# keygen-router, two matcher shards and the notifier, against the local Redis
# (127.0.0.1:6379, or CEPHEID__REDIS__URL). Delivered alerts are appended to
# .local-cluster/alerts.jsonl (JSON lines).
#
#   scripts/local-cluster.sh start    # builds, starts everything, prints the ingest URL
#   scripts/local-cluster.sh status   # the probes of every service
#   scripts/local-cluster.sh stop     # stops everything (alerts and logs stay)
#   CEPHEID_BIN_DIR=DIR scripts/local-cluster.sh start   # the binaries in DIR, not built
#   CEPHEID_TANSU=PATH CEPHEID_BROKER_STORAGE=URL scripts/local-cluster.sh start
#       # another tansu binary, another storage engine (default memory://tansu/;
#       # e.g. sqlite://tansu.db with a tansu built with --features libsql)
#
# Each start uses a Redis prefix of its own (.local-cluster/prefix): the broker
# keeps nothing between starts, so neither may the checkpoints.
# The example rules are stored in Redis with `cepheid rules apply`, each also
# delivering to the alerts file. Ports: ingest 8080, router 9101, notifier
# 9102, shards 9103 and 9104, broker 9092.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.local-cluster
# CEPHEID_BIN_DIR: run the binaries in that directory as they are (nothing
# is built), e.g. to compare two builds on one machine.
bin=${CEPHEID_BIN_DIR:-target/release}
export CEPHEID__KAFKA__BOOTSTRAP=${CEPHEID__KAFKA__BOOTSTRAP:-127.0.0.1:9092}
# Partitions sized to this cluster's consumers: one router reads the events
# topic and one notifier the matches topic, so each has one partition; the
# keyed topic keeps the default eight, for the shards (two here, more can
# join). A partition costs the broker on every post and every fetch (tansu
# lists a partition's stored batches at each fetch that finds new data there),
# and one events partition keeps every key's events in posting order
# (docs/cluster.md, "Sizing the topics"). Each can be overridden from the
# environment: CEPHEID__SHARD__MATCHES_PARTITIONS=8 gave a lower latency tail
# at moderate rates (a shard's release writes its matches to one matches
# partition, so a fetch lists an eighth of the batches) and no better
# saturated throughput (BENCHMARKS.md, "Matches by keyed partition").
export CEPHEID__INGEST__EVENTS_PARTITIONS=${CEPHEID__INGEST__EVENTS_PARTITIONS:-1}
export CEPHEID__ROUTER__EVENTS_PARTITIONS=${CEPHEID__ROUTER__EVENTS_PARTITIONS:-$CEPHEID__INGEST__EVENTS_PARTITIONS}
export CEPHEID__SHARD__MATCHES_PARTITIONS=${CEPHEID__SHARD__MATCHES_PARTITIONS:-1}
export CEPHEID__NOTIFIER_SERVICE__MATCHES_PARTITIONS=${CEPHEID__NOTIFIER_SERVICE__MATCHES_PARTITIONS:-$CEPHEID__SHARD__MATCHES_PARTITIONS}

wait_port() { # host:port, what
  for _ in $(seq 1 150); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "$2 did not come up on $1; see $dir/*.log" >&2
  return 1
}

wait_ready() { # url, what
  for _ in $(seq 1 150); do
    if curl -fsS "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "$2 is not ready at $1: $(curl -sS "$1" 2>&1 || true); see $dir/*.log" >&2
  return 1
}

start_svc() { # name, command...
  local name=$1; shift
  ( exec env "$@" ) >"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

wait_shared() {
  for _ in $(seq 1 300); do
    local held=0
    for port in 9103 9104; do
      n=$(curl -fsS "http://127.0.0.1:$port/metrics" 2>/dev/null | awk '$1 == "cepheid_shard_assigned_partitions" {print $2}')
      [ "${n:-0}" -gt 0 ] 2>/dev/null && held=$((held + 1))
    done
    if [ "$held" -eq 2 ]; then return 0; fi
    sleep 0.2
  done
  echo "the shards have not shared the keyed partitions after 60 s (carrying on; see $dir/shard-*.log)" >&2
}

start() {
  if [ -e "$dir/broker.pid" ]; then echo "already started (scripts/local-cluster.sh stop first)"; exit 1; fi
  mkdir -p "$dir/broker"
  if [ -z "${CEPHEID_BIN_DIR:-}" ]; then
    cargo build --release --bin cepheid --bin cepheid-ingest --bin cepheid-keygen-router --bin cepheid-matcher-shard --bin cepheid-notifier
  fi
  tansu=${CEPHEID_TANSU:-tansu}
  if [ -z "${CEPHEID_TANSU:-}" ] && ! command -v tansu >/dev/null 2>&1; then
    echo "installing tansu (a Kafka-protocol broker; 15-40 minutes the first time)"
    cargo install tansu --locked --features dynostore
  fi
  (cd "$dir/broker" && exec "$tansu" broker --listener-url tcp://127.0.0.1:9092 \
      --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine "${CEPHEID_BROKER_STORAGE:-memory://tansu/}") >"$dir/broker.log" 2>&1 &
  echo $! >"$dir/broker.pid"
  wait_port 127.0.0.1:9092 broker

  # The broker starts empty every time, so shard checkpoints and delivered ids
  # of an earlier start would point at offsets that no longer exist: each start
  # gets a Redis prefix of its own (the previous one is removed).
  if [ -z "${CEPHEID__REDIS__PREFIX:-}" ]; then
    if [ -e "$dir/prefix" ] && command -v redis-cli >/dev/null 2>&1; then
      redis-cli -u "${CEPHEID__REDIS__URL:-redis://127.0.0.1:6379}" --scan --pattern "$(cat "$dir/prefix"):*" \
        | xargs -r -n 500 redis-cli -u "${CEPHEID__REDIS__URL:-redis://127.0.0.1:6379}" del >/dev/null || true
    fi
    export CEPHEID__REDIS__PREFIX="cepheid-local-$(date +%s)"
    echo "$CEPHEID__REDIS__PREFIX" >"$dir/prefix"
  fi

  # The example rules, each also delivering to the alerts file.
  rm -rf "$dir/rules" && mkdir -p "$dir/rules"
  for f in rules/examples/*.json rules/examples/*.yaml; do
    sed -e 's/"targets": \["log"\]/"targets": ["log", "file:alerts"]/' -e 's/targets: \[log\]/targets: [log, "file:alerts"]/' "$f" >"$dir/rules/$(basename "$f")"
  done
  "$bin/cepheid" rules apply "$dir/rules" || true   # already stored at this version: kept

  start_svc ingest CEPHEID__INGEST__LISTEN=127.0.0.1:8080 "$bin/cepheid-ingest"
  start_svc router CEPHEID__ROUTER__LISTEN=127.0.0.1:9101 "$bin/cepheid-keygen-router"
  start_svc shard-1 CEPHEID__SHARD__LISTEN=127.0.0.1:9103 "$bin/cepheid-matcher-shard"
  start_svc shard-2 CEPHEID__SHARD__LISTEN=127.0.0.1:9104 "$bin/cepheid-matcher-shard"
  start_svc notifier CEPHEID__NOTIFIER_SERVICE__LISTEN=127.0.0.1:9102 \
    CEPHEID__NOTIFIER__TARGETS__ALERTS__KIND=file CEPHEID__NOTIFIER__TARGETS__ALERTS__PATH="$PWD/$dir/alerts.jsonl" \
    "$bin/cepheid-notifier"
  wait_ready http://127.0.0.1:8080/readyz ingest
  wait_ready http://127.0.0.1:9101/readyz keygen-router
  wait_ready http://127.0.0.1:9103/readyz matcher-shard-1
  wait_ready http://127.0.0.1:9104/readyz matcher-shard-2
  wait_ready http://127.0.0.1:9102/readyz notifier
  # Both shards hold keyed partitions: the consumer group has shared them out
  # (the first shard to join takes all of them until the second is let in),
  # so what is posted now is not moved between shards a few seconds later.
  wait_shared
  cat <<MSG
Cepheid is running.
  ingest:  http://127.0.0.1:8080/v1/events?source=clickstream   (NDJSON or a JSON array)
  alerts:  $dir/alerts.jsonl
  metrics: :9101 router, :9102 notifier, :9103 and :9104 shards (/metrics)
Try:
  curl -sS --data-binary @samples/clickstream.jsonl 'http://127.0.0.1:8080/v1/events?source=clickstream'
  tail -f $dir/alerts.jsonl
MSG
}

status() {
  for s in 8080:ingest 9101:keygen-router 9103:matcher-shard-1 9104:matcher-shard-2 9102:notifier; do
    printf '%-18s %s\n' "${s#*:}" "$(curl -sS "http://127.0.0.1:${s%%:*}/readyz" 2>&1 || true)"
  done
}

stop() {
  # Services first (SIGTERM: they checkpoint and commit), the broker last.
  for name in ingest router shard-1 shard-2 notifier broker; do
    if [ -e "$dir/$name.pid" ]; then
      pid=$(cat "$dir/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$name.pid"
    fi
  done
  rm -rf "$dir/broker"
  echo "stopped (logs and alerts stay in $dir)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
