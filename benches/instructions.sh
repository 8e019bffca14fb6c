#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind rather than timed, so a busy or noisy
# machine gives the same answer: tokengate (one worker) runs under `valgrind --tool=callgrind` for
# a run of A requests and one of B, and (I_B - I_A) / (B - A) is what one more request costs, with
# start-up, token fetch and connection set-up cancelled out. Three upstream modes side by side:
#
#   plain   http:// origin (HTTP/1.1)
#   h1tls   https:// origin, upstream_protocol: http1 (HTTP/1.1 over TLS)
#   h2tls   https:// origin, HTTP/2 by ALPN (the default for https)
#
#   bash benches/instructions.sh [--token-bytes N] [--requests A,B] [--access-log] [--modes plain,h1tls,h2tls]
#                                [--baseline-bin PATH]
#
# --baseline-bin runs an earlier tokengate build the same way and prints the ratio. The client is
# h2load over HTTP/1.1 with one connection; the origin is nginx with a 100-byte body. It compares;
# it never fails on a number.
set -euo pipefail
cd "$(dirname "$0")/.."

TOKEN_BYTES=1200 REQUESTS=1000,5000 ACCESS_LOG=0 MODES=plain,h1tls,h2tls BASELINE_BIN=
while [ $# -gt 0 ]; do
  case "$1" in
    --token-bytes) TOKEN_BYTES=$2; shift 2 ;;
    --requests) REQUESTS=$2; shift 2 ;;
    --access-log) ACCESS_LOG=1; shift ;;
    --modes) MODES=$2; shift 2 ;;
    --baseline-bin) BASELINE_BIN=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
A=${REQUESTS%%,*} B=${REQUESTS##*,}

. benches/lib.sh
need nginx:nginx h2load:nghttp2-client valgrind:valgrind openssl:openssl curl:curl python3:python3
cargo build --release --quiet
TOKEN=$(python3 -c 'import secrets, sys; n = int(sys.argv[1]); print(secrets.token_urlsafe(n)[:n])' "$TOKEN_BYTES")
ORIGIN=18100 ORIGIN_TLS=18101 PROXY=18102 ADMIN=18103
mkdir -p "$WORK/www" "$WORK/logs"
head -c 100 /dev/zero | tr '\0' 'x' > "$WORK/www/small"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
  -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout "$WORK/origin.key" -out "$WORK/origin.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > "$WORK/san.ext"
openssl x509 -req -in "$WORK/origin.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial -days 2 \
  -extfile "$WORK/san.ext" -out "$WORK/origin.pem" 2>/dev/null
chmod 644 "$WORK"/*.pem "$WORK"/*.key
cat > "$WORK/origin.conf" <<CONF
worker_processes 1;
pid $WORK/origin.pid;
error_log $WORK/logs/origin.err warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$ORIGIN;
    root $WORK/www;
    location = /token { default_type application/json; return 200 '{"access_token":"$TOKEN","token_type":"Bearer","expires_in":3600}'; }
  }
  server {
    listen 127.0.0.1:$ORIGIN_TLS ssl http2;
    ssl_certificate $WORK/origin.pem;
    ssl_certificate_key $WORK/origin.key;
    root $WORK/www;
  }
}
CONF
nginx -c "$WORK/origin.conf" -g 'daemon off;' & PIDS+=($!)

config() {
  local mode=$1 upstream protocol=""
  case "$mode" in
    plain) upstream="http://127.0.0.1:$ORIGIN" ;;
    h1tls) upstream="https://127.0.0.1:$ORIGIN_TLS
    ca_file: $WORK/ca.pem" protocol="    upstream_protocol: http1" ;;
    h2tls) upstream="https://127.0.0.1:$ORIGIN_TLS
    ca_file: $WORK/ca.pem" ;;
  esac
  cat > "$WORK/$mode.yaml" <<CONF
listen: 127.0.0.1:$PROXY
admin:
  listen: 127.0.0.1:$ADMIN
access_log: $([ "$ACCESS_LOG" = 1 ] && echo "$WORK/logs/access.log" || echo off)
providers:
  bench:
    type: oauth2
    token_url: http://127.0.0.1:$ORIGIN/token
    client_id: bench
    client_secret: bench-secret
routes:
  - prefix: /
    upstream: $upstream
    provider: bench
    strip_prefix: false
$protocol
CONF
  chmod 600 "$WORK/$mode.yaml"
}

# count BINARY MODE N: instructions tokengate executed serving N requests (start to exit).
count() {
  local bin=$1 mode=$2 n=$3 out="$WORK/callgrind.out"
  rm -f "$out"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" --log warn run --workers 1 -c "$WORK/$mode.yaml" \
    2>"$WORK/logs/valgrind.err" & local pid=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  h2load --h1 -n "$n" -c 1 "http://127.0.0.1:$PROXY/small" > "$WORK/h2load.out" 2>&1
  grep -q " $n succeeded, 0 failed" "$WORK/h2load.out" \
    || { echo "$mode: not every request succeeded:" >&2; cat "$WORK/h2load.out" >&2; kill "$pid"; exit 1; }
  kill -TERM "$pid"; wait "$pid" || true
  awk '/^(summary|totals):/ { print $2; exit }' "$out"
}

per_request() {
  local bin=$1 mode=$2 a b
  a=$(count "$bin" "$mode" "$A"); b=$(count "$bin" "$mode" "$B")
  echo $(( (b - a) / (B - A) ))
}

echo
echo "### Instructions per request (callgrind, 1 worker, 100 B, ${TOKEN_BYTES}-byte token, access log $([ "$ACCESS_LOG" = 1 ] && echo on || echo off), ($B - $A) requests, $(date -u +%Y-%m-%d))"
echo
if [ -n "$BASELINE_BIN" ]; then
  echo "| upstream | tokengate | baseline | tokengate / baseline |"
  echo "| --- | ---: | ---: | ---: |"
else
  echo "| upstream | instructions per request |"
  echo "| --- | ---: |"
fi
for mode in ${MODES//,/ }; do
  config "$mode"
  mine=$(per_request ./target/release/tokengate "$mode")
  if [ -n "$BASELINE_BIN" ]; then
    base=$(per_request "$BASELINE_BIN" "$mode")
    awk -v m="$mode" -v a="$mine" -v b="$base" 'BEGIN { printf "| %s | %d | %d | %.3f |\n", m, a, b, a / b }'
  else
    echo "| $mode | $mine |"
  fi
done
