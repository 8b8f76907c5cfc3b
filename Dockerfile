# syntax=docker/dockerfile:1
#
# fibonacci-api container image.
#
#   docker build -t fibonacci-api \
#     --build-arg VERSION="$(git describe --tags --always)" \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
#   docker run --rm --read-only -p 5000:5000 fibonacci-api
#
# Three build stages share the cargo-chef image: `planner` reduces the
# workspace to a recipe of its dependencies, `builder` compiles that recipe in a
# layer of its own (rebuilt only when Cargo.toml or Cargo.lock change), then
# the service. The final image is distroless: glibc and CA certificates, no
# shell, no package manager, running as an unprivileged numeric user.
# The build context is an allow-list (.dockerignore): only what cargo needs.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS chef
ARG CARGO_CHEF_VERSION=0.1.73
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin fibonacci-api
COPY . .
# build.rs stamps build_info{revision} from GIT_REVISION: the context has no .git.
ARG REVISION=unknown
RUN GIT_REVISION="${REVISION}" cargo build --release --locked --bin fibonacci-api \
    && install -D -m 0755 target/release/fibonacci-api /out/fibonacci-api

# cc: glibc + libgcc for the Rust binary; :nonroot is uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.0.0-dev
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
LABEL org.opencontainers.image.title="fibonacci-api" \
      org.opencontainers.image.description="REST API returning exact Fibonacci numbers" \
      org.opencontainers.image.source="https://github.com/example/fibonacci-api" \
      org.opencontainers.image.url="https://github.com/example/fibonacci-api" \
      org.opencontainers.image.documentation="https://github.com/example/fibonacci-api#readme" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /out/fibonacci-api /usr/local/bin/fibonacci-api

# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
EXPOSE 5000
# The service writes nothing to disk: run it with --read-only (Docker) or
# readOnlyRootFilesystem (Kubernetes).

# No shell or curl in the image: the binary probes its own /livez.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/fibonacci-api", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/fibonacci-api"]
