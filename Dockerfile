# syntax=docker/dockerfile:1
#
# fibonacci-api container image.
#
#   docker build -t fibonacci-api \
#     --build-arg VERSION="$(git describe --tags --always)" \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE_DATE_EPOCH="$(git log -1 --format=%ct)" .
#   docker run --rm --read-only -p 5000:5000 fibonacci-api
#
# Reproducible: base images pinned by digest (Dependabot proposes new digests),
# no build-time timestamp in the image; BuildKit takes every date it records
# from SOURCE_DATE_EPOCH (the commit time), so the same commit builds the same
# image metadata.
#
# Three build stages share the cargo-chef image: `planner` reduces the
# workspace to a recipe of its dependencies, `builder` compiles that recipe in a
# layer of its own (rebuilt only when Cargo.toml or Cargo.lock change), then
# the service. The final image is distroless: glibc and CA certificates, no
# shell, no package manager, running as an unprivileged numeric user.
# The build context is an allow-list (.dockerignore): only what cargo needs.

# The toolchain: keep in step with RUST_TOOLCHAIN in .github/workflows/ci.yml.
FROM rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS chef
ARG CARGO_CHEF_VERSION=0.1.73
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# The allocator's run-time options are compiled in from here (tikv-jemalloc-sys).
COPY .cargo/config.toml .cargo/config.toml
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin fibonacci-api
COPY . .
# build.rs stamps build_info{revision} from GIT_REVISION: the context has no .git.
ARG REVISION=unknown
RUN GIT_REVISION="${REVISION}" cargo build --release --locked --bin fibonacci-api \
    && install -D -m 0755 target/release/fibonacci-api /out/fibonacci-api

# cc: glibc + libgcc for the Rust binary; :nonroot is uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

ARG VERSION=0.0.0-dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fibonacci-api" \
      org.opencontainers.image.description="REST API returning exact Fibonacci numbers" \
      org.opencontainers.image.source="https://github.com/example/fibonacci-api" \
      org.opencontainers.image.url="https://github.com/example/fibonacci-api" \
      org.opencontainers.image.documentation="https://github.com/example/fibonacci-api#readme" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /out/fibonacci-api /usr/local/bin/fibonacci-api

# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
# [::] is dual-stack (IPv6 and IPv4 clients; IPv4 only where the kernel has no
# IPv6). The binary's own default stays 0.0.0.0:5000.
ENV LISTEN_ADDR="[::]:5000"
EXPOSE 5000
# The service writes nothing to disk: run it with --read-only (Docker) or
# readOnlyRootFilesystem (Kubernetes).

# No shell or curl in the image: the binary probes its own /livez, on the
# address LISTEN_ADDR / ADMIN_LISTEN_ADDR of the container says.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/fibonacci-api", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/fibonacci-api"]
