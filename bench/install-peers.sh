#!/usr/bin/env bash
# Installs the peers the benchmark compares against: Squid and tinyproxy (Debian packages)
# and http-tunnel (crates.io). Each is optional: the benchmark skips a peer it cannot find.
set -uo pipefail
if ! command -v squid >/dev/null 2>&1 && [ ! -x /usr/sbin/squid ] || ! command -v tinyproxy >/dev/null 2>&1 && [ ! -x /usr/bin/tinyproxy ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq squid tinyproxy || echo "could not install squid/tinyproxy"
  # The packages start system services; the benchmark runs its own instances.
  service squid stop >/dev/null 2>&1 || true
  service tinyproxy stop >/dev/null 2>&1 || true
fi
command -v http-tunnel >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/http-tunnel" ] || cargo install --locked http-tunnel || cargo install http-tunnel || echo "could not install http-tunnel"
# TLS termination peers (hitch, stunnel, HAProxy, nginx with its stream module) and the load generator.
if ! command -v hitch >/dev/null 2>&1 && [ ! -x /usr/sbin/hitch ] || ! command -v wrk >/dev/null 2>&1 \
  || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ] || ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ] \
  || ! command -v stunnel4 >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hitch stunnel4 haproxy nginx-light libnginx-mod-stream wrk openssl \
    || echo "could not install the TLS termination peers"
  for s in hitch stunnel4 haproxy nginx; do service "$s" stop >/dev/null 2>&1 || true; done
fi
