# One image for every Cepheid service (and the CLI).
#   docker build -t cepheid .
# Multi-stage: build with the Rust toolchain, run on a slim Debian as a
# non-root user (uid 10001, as the Helm chart's securityContext expects).
FROM rust:1.95-bookworm AS build
WORKDIR /src
# librdkafka is built from source by rdkafka-sys (needs cmake-free build tools).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential pkg-config python3 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked \
      --bin cepheid --bin cepheid-ingest --bin cepheid-keygen-router \
      --bin cepheid-matcher-shard --bin cepheid-notifier \
 && mkdir /out \
 && cp target/release/cepheid target/release/cepheid-ingest target/release/cepheid-keygen-router \
       target/release/cepheid-matcher-shard target/release/cepheid-notifier /out/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 cepheid && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cepheid
COPY --from=build /out/ /usr/local/bin/
COPY rules/examples /usr/share/cepheid/rules/examples
USER 10001:10001
# The chart sets the command per service; the CLI by default.
ENTRYPOINT []
CMD ["cepheid", "--help"]
