#!/usr/bin/env bash
# The whole benchmark: peers, release builds, then every scenario through every target.
# Extra arguments go to tunnelgate-bench (see `--help`), e.g. `bash bench/run.sh --rounds 5`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/install-peers.sh
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"
cargo build --release --locked -p tunnelgate-proxy -p tunnelgate-bench
exec ./target/release/tunnelgate-bench --proxy-bin target/release/tunnelgate-proxy "$@"
