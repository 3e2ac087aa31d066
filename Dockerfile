# syntax=docker/dockerfile:1
#
# The Trailmark image: one binary, every role.
#
#   docker build -t trailmark .
#   docker run -p 8080:8080 -v trailmark-data:/data trailmark            # serve, embedded log and store
#   docker run -e TRAILMARK_LOG_URI=kafka://... -e TRAILMARK_STORE_URI=scylla://... trailmark ingest
#
# deploy/docker-compose.yml and deploy/k8s/ run the roles separately on Kafka
# and ScyllaDB; deploy/README.md explains both.

# Kept equal to rust-toolchain.toml, so that rustup finds the pinned toolchain
# already installed and downloads nothing.
ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-bookworm AS builder

# rdkafka builds librdkafka from source (make, a C compiler, perl, python3,
# zlib; ssl and sasl when those features are on); cmake covers the cmake-built
# variant should the feature set change. Debian package versions are not
# pinned: bookworm only ships security fixes, and the mirror drops superseded
# versions, so a pin would break the build rather than make it reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake perl python3 zlib1g-dev libssl-dev libsasl2-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# A workspace makes "copy the manifests first" brittle, so the sources go in
# whole and BuildKit cache mounts keep the registry and target/ between
# builds. target/ is a cache mount, so the binary is copied out in the same
# step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p trailmark --bin trailmark \
 && install -m 0755 target/release/trailmark /usr/local/bin/trailmark

FROM debian:bookworm-slim

# ca-certificates for TLS to managed Kafka and Scylla; libssl3, libsasl2-2 and
# zlib1g for librdkafka; curl only for container health checks (the binary has
# no health-check subcommand). Unpinned for the reason given above.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libssl3 libsasl2-2 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 trailmark \
 && useradd --system --uid 10001 --gid trailmark --home-dir /data --shell /usr/sbin/nologin trailmark \
 && mkdir -p /data \
 && chown trailmark:trailmark /data

COPY --from=builder /usr/local/bin/trailmark /usr/local/bin/trailmark

# Listen on every interface inside the container; the default 127.0.0.1 would
# be unreachable through a published port. /data holds the embedded log and
# store of `serve`; the distributed roles keep their state in Kafka and Scylla.
ENV TRAILMARK_LISTEN=0.0.0.0:8080 \
    TRAILMARK_DATA_DIR=/data

VOLUME ["/data"]
WORKDIR /data
EXPOSE 8080

# A numeric user, so that Kubernetes can check runAsNonRoot.
USER 10001:10001

ENTRYPOINT ["trailmark"]
CMD ["serve"]
