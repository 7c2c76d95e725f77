# syntax=docker/dockerfile:1.7
# One image with both binaries, non-root, no shell at run time.
#   docker build -t tunnelgate .                   # both binaries, ENTRYPOINT tunnelgate-proxy
#   docker build --target operator -t tg-op .      # ENTRYPOINT tunnelgate-operator
# The Helm chart sets `command` explicitly, so the default image serves both workloads.

FROM rust:1.95-bookworm AS build
# Set by BuildKit per platform; keys the target cache so that a multi-platform build never copies
# the other platform's binaries out of a shared cache.
ARG TARGETPLATFORM
# The commit stamped into build_info (the build context has no .git):
#   docker build --build-arg GIT_SHA=$(git rev-parse --short=12 HEAD) .
ARG GIT_SHA=""
ENV TUNNELGATE_GIT_SHA=$GIT_SHA
WORKDIR /src
# Dependencies first: this layer only changes with the manifests and Cargo.lock.
COPY Cargo.toml Cargo.lock ./
COPY proxy-config/Cargo.toml proxy-config/
COPY proxy/Cargo.toml proxy/
COPY operator/Cargo.toml operator/
COPY bench/Cargo.toml bench/
COPY e2e/Cargo.toml e2e/
COPY testkit/Cargo.toml testkit/
COPY build/ build/
RUN for d in proxy-config proxy operator bench e2e testkit; do mkdir -p $d/src/bin && echo 'fn main() {}' > $d/src/main.rs && touch $d/src/lib.rs; done \
 && echo 'fn main() {}' > operator/src/bin/crdgen.rs \
 && echo 'fn main() {}' > operator/src/bin/kubectl-tunnelgate.rs \
 && mkdir -p proxy-config/src && printf 'version: 1\n' > proxy-config/src/default.yaml
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo fetch --locked
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=tunnelgate-target-$TARGETPLATFORM,target=/src/target \
    cargo build --release --locked -p tunnelgate-proxy -p tunnelgate-operator \
 && mkdir -p /out && cp target/release/tunnelgate-proxy target/release/tunnelgate-operator /out/

# glibc and libgcc only (aws-lc and mimalloc link against them); runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime-base
COPY --from=build /out/tunnelgate-proxy /out/tunnelgate-operator /usr/local/bin/
USER 65532:65532

FROM runtime-base AS operator
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tunnelgate-operator"]

FROM runtime-base AS proxy
EXPOSE 3128 9090
ENTRYPOINT ["/usr/local/bin/tunnelgate-proxy"]
