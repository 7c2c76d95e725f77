#!/usr/bin/env bash
# Installs the peers the benchmark compares against: Squid and tinyproxy (Debian packages)
# and http-tunnel (crates.io). Each is optional: the benchmark skips a peer it cannot find.
set -uo pipefail
# Whether a program is missing: neither on PATH nor at its Debian path.
missing() { ! command -v "$1" >/dev/null 2>&1 && [ ! -x "$2" ]; }
if missing squid /usr/sbin/squid || missing tinyproxy /usr/bin/tinyproxy; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq squid tinyproxy || echo "could not install squid/tinyproxy"
  # The packages start system services; the benchmark runs its own instances.
  service squid stop >/dev/null 2>&1 || true
  service tinyproxy stop >/dev/null 2>&1 || true
fi
command -v http-tunnel >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/http-tunnel" ] || cargo install --locked http-tunnel || cargo install http-tunnel || echo "could not install http-tunnel"
# TLS termination peers (hitch, stunnel, HAProxy, nginx with its stream module) and the load generator.
if missing hitch /usr/sbin/hitch || missing wrk /usr/bin/wrk || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ] \
  || missing haproxy /usr/sbin/haproxy || missing stunnel4 /usr/bin/stunnel4; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hitch stunnel4 haproxy nginx-light libnginx-mod-stream wrk openssl \
    || echo "could not install the TLS termination peers"
  for s in hitch stunnel4 haproxy nginx; do service "$s" stop >/dev/null 2>&1 || true; done
fi
