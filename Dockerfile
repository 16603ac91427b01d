# syntax=docker/dockerfile:1
#
# tiergate container image.
#   docker build -t tiergate .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/my-tiergate.yaml:/etc/tiergate/tiergate.yaml:ro" \
#     -e TIERGATE_JWT_SECRET -e TIERGATE_ADMIN_TOKEN tiergate
# The image's default config is config/tiergate.yaml (the annotated example);
# mount your own over /etc/tiergate/tiergate.yaml. The full stack (Redis, a
# demo upstream, Prometheus, Grafana) is deploy/docker-compose.yml; see
# docs/OPERATIONS.md.

# ---------------------------------------------------------------- build stage
FROM rust:1-bookworm AS build
WORKDIR /src
# Only what `cargo build` reads: the manifest names benches/decision.rs, so
# it has to be present even though the release binary does not use it, and
# `tiergate demo` embeds config/tiergate.yaml (include_str!).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config/tiergate.yaml ./config/tiergate.yaml
# BuildKit cache mounts keep the registry and target dir between builds; the
# binary is copied out of the cached target dir in the same step.
RUN --mount=type=cache,id=tiergate-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=tiergate-target,target=/src/target \
    cargo build --release --locked --bin tiergate \
 && install -D -m 0755 target/release/tiergate /out/tiergate

# -------------------------------------------------------------- runtime stage
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tiergate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/tiergate --shell /usr/sbin/nologin tiergate \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/tiergate \
 && install -d -m 0755 /etc/tiergate
COPY --from=build /out/tiergate /usr/local/bin/tiergate
COPY config/tiergate.yaml /etc/tiergate/tiergate.yaml
ENV TIERGATE_CONFIG=/etc/tiergate/tiergate.yaml
# Relative paths in the config (the memory backend's state_file) land here,
# the one directory the unprivileged user can write.
WORKDIR /var/lib/tiergate
USER 10001:10001
# 8080: proxy listener (server.listen); 9090: admin listener (admin.listen,
# /healthz /readyz /metrics /v1/*). The admin listener defaults to
# 127.0.0.1:9090, which is enough for the health check below; set
# admin.listen to 0.0.0.0:9090 for Prometheus to scrape it from outside.
EXPOSE 8080 9090
# Liveness: `tiergate health` GETs /healthz on the admin listener
# (default http://127.0.0.1:9090; `--admin URL` for another address).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["tiergate", "health"]
# SIGTERM (docker stop) drains in-flight requests for up to
# server.shutdown_grace (30s); give `docker stop -t` / stop_grace_period more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tiergate"]
CMD ["serve"]
