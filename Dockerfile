# syntax=docker/dockerfile:1
# buildkit-router image: ghcr.io/buildkit-router/buildkit-router:<version>
#   docker buildx build -t ghcr.io/buildkit-router/buildkit-router:0.1.0 .
# Multi-platform works through BuildKit's emulation or native nodes:
#   docker buildx build --platform linux/amd64,linux/arm64 ...

FROM rust:1-bookworm AS build
WORKDIR /src
# The protos are compiled by build.rs with a pure-Rust compiler (no protoc needed).
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
COPY tests ./tests
# Cache the registry and the target dir between builds; copy the binary out of the cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin buildkit-router \
 && install -D -m 0755 target/release/buildkit-router /out/buildkit-router

# distroless/cc: glibc + libgcc for a Rust binary, no shell, no package manager. The nonroot tag
# runs as uid/gid 65532, which the Kubernetes manifests also set (runAsNonRoot needs a numeric
# uid to verify). TLS roots are not needed: the router only trusts the CAs it is given.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/buildkit-router /usr/local/bin/buildkit-router
USER 65532:65532
# 1234: BuildKit gRPC (clients); 9180: admin HTTP (/metrics, /healthz, /readyz, /status).
EXPOSE 1234 9180
ENTRYPOINT ["buildkit-router"]
