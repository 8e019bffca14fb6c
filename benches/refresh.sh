#!/usr/bin/env bash
# p99 latency while tokens refresh under load: tokengate with 2-second tokens (a background
# refresh about every second) against the same setup with 1-hour tokens, wrk driving both.
#
#   bash benches/refresh.sh [--workers N] [--duration SECONDS] [--rounds R]
#
# Prints the two p99s, their ratio and the failed requests; it never fails on a number.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=2 DURATION=10 ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. benches/lib.sh
need nginx:nginx wrk:wrk curl:curl
cargo build --release --quiet

ORIGIN=18100 TG=18101 ADMIN=18102
mkdir -p "$WORK/www"
head -c 100 /dev/zero | tr '\0' 'x' > "$WORK/www/small"
servers=$(cat <<CONF
  server {
    listen 127.0.0.1:$ORIGIN;
    root $WORK/www;
    location = /token-short { default_type application/json; return 200 '{"access_token":"short-\$request_id","token_type":"Bearer","expires_in":2}'; }
    location = /token-long { default_type application/json; return 200 '{"access_token":"long-token","token_type":"Bearer","expires_in":3600}'; }
  }
CONF
)
start_origin "$servers"
sleep 0.3

measure() {
  local endpoint=$1
  cat > "$WORK/tg.yaml" <<CONF
listen: 127.0.0.1:$TG
admin:
  listen: 127.0.0.1:$ADMIN
access_log: off
providers:
  p:
    type: oauth2
    token_url: http://127.0.0.1:$ORIGIN/$endpoint
    client_id: bench
    client_secret: bench-secret
routes:
  - prefix: /
    upstream: http://127.0.0.1:$ORIGIN
    provider: p
    strip_prefix: false
CONF
  chmod 600 "$WORK/tg.yaml"
  ./target/release/tokengate --log warn run --workers "$WORKERS" -c "$WORK/tg.yaml" 2>/dev/null & local pid=$!
  wait_ready "$ADMIN"
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$TG/small")" != 200 ]; then
    echo "tokengate does not proxy /small" >&2; exit 1
  fi
  wrk -t2 -c50 -d"${DURATION}s" --latency "http://127.0.0.1:$TG/small" > "$WORK/wrk.txt"
  local fetches
  fetches=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^tokengate_token_fetches_total/ {s += $2} END {print s+0}')
  kill "$pid"; wait "$pid" 2>/dev/null || true
  # Failed: non-2xx answers plus socket errors (connect, read, write, timeout).
  awk -v f="$fetches" '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec/ { rps=$2 } /^ +99%/ { p99=ms($2) } /Non-2xx/ { bad+=$NF }
    /Socket errors/ { for (i = 3; i <= NF; i += 2) { v = $(i+1); gsub(",", "", v); bad += v } }
    END { printf "%s %s %d %s\n", rps, p99, bad+0, f }' "$WORK/wrk.txt"
}

median() { sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

# Interleaved rounds, since one 99th percentile over a few seconds is noisy.
: > "$WORK/long"; : > "$WORK/short"
for _ in $(seq "$ROUNDS"); do
  measure token-long >> "$WORK/long"
  measure token-short >> "$WORK/short"
done
col() { cut -d' ' -f"$2" "$WORK/$1" | median; }
sum() { awk -v c="$2" '{s += $c} END {print s+0}' "$WORK/$1"; }
echo
echo "### refresh under load: workers=$WORKERS, 50 connections, ${DURATION}s x $ROUNDS rounds ($(date -u +%Y-%m-%d))"
echo
echo "| tokens | req/s (median) | p99 ms (median) | failed requests (all rounds) | token fetches per round |"
echo "| --- | ---: | ---: | ---: | ---: |"
echo "| 1 h (steady state) | $(col long 1) | $(col long 2) | $(sum long 3) | $(col long 4) |"
echo "| 2 s (refresh every ~1 s) | $(col short 1) | $(col short 2) | $(sum short 3) | $(col short 4) |"
awk -v a="$(col short 2)" -v b="$(col long 2)" 'BEGIN { printf "\np99 during refreshes / steady state: %.2f\n", a/b }'
