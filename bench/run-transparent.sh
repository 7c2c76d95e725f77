#!/usr/bin/env bash
# The forward suite with Tunnelgate's transparent listener beside CONNECT and a direct connection,
# in one run, inside a network namespace of its own (the transparent target adds an nftables
# redirect; needs root and nft). Extra arguments go to tunnelgate-bench, e.g.
#   bench/run-transparent.sh --scenarios setup,round-trips --rounds 3
set -euo pipefail
cd "$(dirname "$0")/.."
ns="tgbench-$$"
ip netns add "$ns"
trap 'ip netns del "$ns"' EXIT
ip -n "$ns" link set lo up
ip netns exec "$ns" target/release/tunnelgate-bench --suite forward --only direct,tunnelgate,transparent "$@"
