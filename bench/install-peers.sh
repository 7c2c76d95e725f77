#!/usr/bin/env bash
# Installs the peer proxies the benchmark compares against: Squid and tinyproxy (Debian packages)
# and http-tunnel (crates.io). Each is optional: the benchmark skips a peer it cannot find.
set -uo pipefail
if ! command -v squid >/dev/null 2>&1 && [ ! -x /usr/sbin/squid ] || ! command -v tinyproxy >/dev/null 2>&1 && [ ! -x /usr/bin/tinyproxy ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq squid tinyproxy || echo "could not install squid/tinyproxy"
  # The packages start system services; the benchmark runs its own instances.
  service squid stop >/dev/null 2>&1 || true
  service tinyproxy stop >/dev/null 2>&1 || true
fi
command -v http-tunnel >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/http-tunnel" ] || cargo install --locked http-tunnel || cargo install http-tunnel || echo "could not install http-tunnel"
