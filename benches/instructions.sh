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
#                                [--baseline-bin PATH] [--bin PATH] [--cache-sim] [--keep DIR]
#
# --bin PATH measures that build instead of this checkout's release build (a variant built with
# other profile settings, say). --cache-sim also counts level-1 instruction-cache misses per
# request (callgrind's cache simulation): the code footprint a request touches.
# --keep DIR keeps each B-request callgrind profile as DIR/MODE.callgrind (for callgrind_annotate).
# --baseline-bin runs an earlier tokengate build the same way and prints the ratio. The client is
# h2load over HTTP/1.1 with one connection; the origin is nginx with a 100-byte body. It compares;
# it never fails on a number.
set -euo pipefail
cd "$(dirname "$0")/.."

TOKEN_BYTES=1200 REQUESTS=1000,5000 ACCESS_LOG=0 MODES=plain,h1tls,h2tls BASELINE_BIN= KEEP= BIN=./target/release/tokengate
CACHE_SIM=no
while [ $# -gt 0 ]; do
  case "$1" in
    --token-bytes) TOKEN_BYTES=$2; shift 2 ;;
    --requests) REQUESTS=$2; shift 2 ;;
    --access-log) ACCESS_LOG=1; shift ;;
    --modes) MODES=$2; shift 2 ;;
    --baseline-bin) BASELINE_BIN=$2; shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --cache-sim) CACHE_SIM=yes; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
A=${REQUESTS%%,*} B=${REQUESTS##*,}

. benches/lib.sh
need nginx:nginx h2load:nghttp2-client valgrind:valgrind openssl:openssl curl:curl python3:python3
cargo build --release --quiet
TOKEN=$(random_token "$TOKEN_BYTES")
ORIGIN=18100 ORIGIN_TLS=18101 PROXY=18102 ADMIN=18103
mkdir -p "$WORK/www" "$WORK/logs"
head -c 100 /dev/zero | tr '\0' 'x' > "$WORK/www/small"

origin_pki
servers=$(cat <<CONF
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
CONF
)
start_origin "$servers"

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
  valgrind --tool=callgrind --cache-sim="$CACHE_SIM" --callgrind-out-file="$out" "$bin" --log warn run --workers 1 -c "$WORK/$mode.yaml" \
    2>"$WORK/logs/valgrind.err" & local pid=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  h2load --h1 -n "$n" -c 1 "http://127.0.0.1:$PROXY/small" > "$WORK/h2load.out" 2>&1
  grep -q " $n succeeded, 0 failed" "$WORK/h2load.out" \
    || { echo "$mode: not every request succeeded:" >&2; cat "$WORK/h2load.out" >&2; kill "$pid"; exit 1; }
  kill -TERM "$pid"; wait "$pid" || true
  # Ir, and with the cache simulation I1mr: "events:" names the columns of "summary:".
  awk '/^events:/ { for (i = 2; i <= NF; i++) col[$i] = i }
       /^(summary|totals):/ { print $(col["Ir"]), (("I1mr" in col) ? $(col["I1mr"]) : 0); exit }' "$out"
}

# per_request BINARY MODE: "instructions I1-misses" per request.
per_request() {
  local bin=$1 mode=$2 a b
  a=$(count "$bin" "$mode" "$A"); b=$(count "$bin" "$mode" "$B")
  if [ -n "$KEEP" ] && [ "$bin" = "$BIN" ]; then mkdir -p "$KEEP"; cp "$WORK/callgrind.out" "$KEEP/$mode.callgrind"; fi
  awk -v a="$a" -v b="$b" -v n=$((B - A)) 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%d %d\n", (y[1] - x[1]) / n, (y[2] - x[2]) / n }'
}

echo
echo "### Instructions per request (callgrind, 1 worker, 100 B, ${TOKEN_BYTES}-byte token, access log $([ "$ACCESS_LOG" = 1 ] && echo on || echo off), ($B - $A) requests, $(date -u +%Y-%m-%d))"
echo
if [ -n "$BASELINE_BIN" ]; then
  echo "| upstream | instructions | baseline | ratio | I1 misses | baseline | ratio |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
else
  echo "| upstream | instructions per request | I1 misses per request |"
  echo "| --- | ---: | ---: |"
fi
for mode in ${MODES//,/ }; do
  config "$mode"
  read -r ir i1 < <(per_request "$BIN" "$mode")
  if [ -n "$BASELINE_BIN" ]; then
    read -r bir bi1 < <(per_request "$BASELINE_BIN" "$mode")
    awk -v m="$mode" -v a="$ir" -v b="$bir" -v c="$i1" -v d="$bi1" \
      'BEGIN { printf "| %s | %d | %d | %.3f | %d | %d | %s |\n", m, a, b, a / b, c, d, (d > 0 ? sprintf("%.3f", c / d) : "-") }'
  else
    echo "| $mode | $ir | $([ "$CACHE_SIM" = yes ] && echo "$i1" || echo -) |"
  fi
done
