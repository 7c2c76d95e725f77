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

# `nft` (Debian's nftables) with the libraries it links, glibc excepted (the runtime base has
# it): the proxy writes the node's redirect rules with it in transparent mode. Each library goes to
# its real directory (merged /usr), where the loader looks without an ld.so.cache.
FROM debian:bookworm-slim AS nft
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables \
 && mkdir -p /nft/usr/sbin && cp /usr/sbin/nft /nft/usr/sbin/ \
 && for lib in $(ldd /usr/sbin/nft | awk '/=> \//{print $3}'); do \
      case "$lib" in */libc.so.*) continue ;; esac; \
      dir=$(dirname "$(readlink -f "$lib")"); mkdir -p "/nft$dir"; cp -L "$lib" "/nft$dir/"; \
    done \
 && /usr/sbin/nft --version

# glibc and libgcc only (aws-lc and mimalloc link against them), and nft; runs as uid 65532 (the
# chart runs transparent-mode proxies as root with NET_ADMIN alone, for nft).
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime-base
COPY --from=nft /nft/ /
COPY --from=build /out/tunnelgate-proxy /out/tunnelgate-operator /usr/local/bin/
USER 65532:65532

FROM runtime-base AS operator
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tunnelgate-operator"]

FROM runtime-base AS proxy
EXPOSE 3128 9090
ENTRYPOINT ["/usr/local/bin/tunnelgate-proxy"]
