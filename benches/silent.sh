#!/usr/bin/env bash
# Connections that never earn their slot: normal traffic while 10,000 silent sockets are opened
# at 1,000/s and held, and /healthz while the admin port is flooded the same way.
#
#   bash benches/silent.sh [--baseline GIT_REV] [--silent N] [--rate PER_SECOND] [--duration S]
#
# With --baseline, that revision is built too and both run side by side, each on its own ports,
# one after the other, with the same load; the table shows both and their ratio. It compares; it
# never fails on a number.
set -euo pipefail
cd "$(dirname "$0")/.."

BASELINE="" SILENT=10000 RATE=1000 DURATION=8
while [ $# -gt 0 ]; do
  case "$1" in
    --baseline) BASELINE=$2; shift 2 ;;
    --silent) SILENT=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

. benches/lib.sh
need nginx:nginx wrk:wrk curl:curl python3:python3
# The flood holds more sockets than the usual soft limit of 1,024.
ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet
declare -A BIN=([current]=./target/release/tokengate)
if [ -n "$BASELINE" ]; then
  git worktree add --detach "$WORK/baseline" "$BASELINE" >/dev/null 2>&1
  (cd "$WORK/baseline" && CARGO_TARGET_DIR="$WORK/baseline-target" cargo build --release --quiet)
  git worktree remove --force "$WORK/baseline" >/dev/null
  BIN[baseline]="$WORK/baseline-target/release/tokengate"
fi

ORIGIN=18100
mkdir -p "$WORK/www" "$WORK/logs"
head -c 100 /dev/zero | tr '\0' 'x' > "$WORK/www/small"
servers=$(cat <<CONF
  server {
    listen 127.0.0.1:$ORIGIN;
    root $WORK/www;
    location = /token { default_type application/json; return 200 '{"access_token":"bench-token","token_type":"Bearer","expires_in":3600}'; }
  }
CONF
)
start_origin "$servers"

# flood PORT N RATE HOLD_SECONDS: opens N sockets at RATE per second that send nothing, holds
# them, and prints how many it opened and how many the server closed before the end.
cat > "$WORK/flood.py" <<'PY'
import asyncio, sys
port, n, rate, hold = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
opened = closed = failed = 0
async def one():
    global opened, closed, failed
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        failed += 1
        return
    opened += 1
    try:
        if await asyncio.wait_for(r.read(1), hold) == b"":
            closed += 1
    except (asyncio.TimeoutError, OSError):
        pass
    w.close()
async def main():
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    print(opened, closed, failed)
asyncio.run(main())
PY

# wrk for DURATION: "requests_per_second p99_ms non_2xx_or_errors".
load() {
  wrk -t1 -c50 -d"${DURATION}s" --latency "http://127.0.0.1:$1/small" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec/ { rps=$2 }
    /^ +99%/ { p99=ms($2) }
    /Non-2xx/ { bad+=$NF }
    /Socket errors/ { gsub(/,/, ""); bad+=$4+$6+$8+$10 }
    END { printf "%s %s %d\n", rps, p99, bad }'
}

# probe URL COUNT: "p50_ms p99_ms failures" of COUNT requests, each on a new connection, one
# every 50 ms (a probe, or a client that connects while the flood holds the slots).
probe() {
  for _ in $(seq "$2"); do
    curl -s -o /dev/null -m 5 -w '%{http_code} %{time_total}\n' "$1" || echo "000 5"
    sleep 0.05
  done > "$WORK/healthz"
  local bad n
  bad=$(awk '$1 != 200' "$WORK/healthz" | wc -l)
  awk '{ printf "%.2f\n", $2 * 1000 }' "$WORK/healthz" | sort -g > "$WORK/healthz.sorted"
  n=$(wc -l < "$WORK/healthz.sorted")
  echo "$(sed -n "$((n / 2 + 1))p" "$WORK/healthz.sorted") $(sed -n "$(((n * 99 + 99) / 100))p" "$WORK/healthz.sorted") $bad"
}

declare -A R
port=18110
for which in "${!BIN[@]}"; do
  proxy=$port admin=$((port + 1)); port=$((port + 10))
  cat > "$WORK/$which.yaml" <<CONF
listen: 127.0.0.1:$proxy
admin:
  listen: 127.0.0.1:$admin
$([ "$which" = current ] && echo 'access_log: off')
providers:
  bench: {type: oauth2, token_url: "http://127.0.0.1:$ORIGIN/token", client_id: bench, client_secret: bench-secret}
routes:
  - {prefix: /, upstream: "http://127.0.0.1:$ORIGIN", provider: bench, strip_prefix: false}
CONF
  chmod 600 "$WORK/$which.yaml"
  "${BIN[$which]}" --log warn run --workers 1 -c "$WORK/$which.yaml" 2>"$WORK/logs/$which.err" & pid=$!; PIDS+=($pid)
  wait_ready "$admin"
  R[$which.quiet]=$(load "$proxy")
  # Proxy port: the flood ramps up for SILENT/RATE seconds, then normal traffic runs beside it.
  hold=$(( SILENT / RATE + DURATION + 5 ))
  python3 "$WORK/flood.py" "$proxy" "$SILENT" "$RATE" "$hold" > "$WORK/$which.flood" & flood=$!; PIDS+=($flood)
  sleep $(( SILENT / RATE ))
  R[$which.flooded]=$(load "$proxy")
  R[$which.fresh]=$(probe "http://127.0.0.1:$proxy/small" 20)
  R[$which.rss]=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  R[$which.open]=$(ls "/proc/$pid/fd" | wc -l)
  wait "$flood" || true
  R[$which.flood]=$(cat "$WORK/$which.flood")
  # Admin port: the same flood, and a probe every 50 ms.
  python3 "$WORK/flood.py" "$admin" "$((SILENT / 2))" "$RATE" "$(( SILENT / 2 / RATE + 10 ))" > /dev/null & flood=$!; PIDS+=($flood)
  sleep 2
  R[$which.healthz]=$(probe "http://127.0.0.1:$admin/healthz" 100)
  wait "$flood" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
done

col() { echo "${R[$1]}" | awk -v i="$2" '{print $i}'; }
echo
echo "| ${SILENT} silent sockets at ${RATE}/s, 1 worker | ${!BIN[*]} |"
echo "|---|$(for _ in "${!BIN[@]}"; do printf -- '---|'; done)"
printf '| req/s, no flood |'; for w in "${!BIN[@]}"; do printf ' %s |' "$(col "$w.quiet" 1)"; done; echo
printf '| p99 ms, no flood |'; for w in "${!BIN[@]}"; do printf ' %s |' "$(col "$w.quiet" 2)"; done; echo
printf '| req/s beside the flood |'; for w in "${!BIN[@]}"; do printf ' %s |' "$(col "$w.flooded" 1)"; done; echo
printf '| p99 ms beside the flood |'; for w in "${!BIN[@]}"; do printf ' %s |' "$(col "$w.flooded" 2)"; done; echo
printf '| failed requests beside the flood |'; for w in "${!BIN[@]}"; do printf ' %s |' "$(col "$w.flooded" 3)"; done; echo
printf '| new connections beside the flood: p50 / p99 ms |'; for w in "${!BIN[@]}"; do printf ' %s / %s |' "$(col "$w.fresh" 1)" "$(col "$w.fresh" 2)"; done; echo
printf '| new connections beside the flood: failures of 20 |'; for w in "${!BIN[@]}"; do printf ' %s |' "$(col "$w.fresh" 3)"; done; echo
printf '| peak RSS MiB |'; for w in "${!BIN[@]}"; do printf ' %s |' "$(awk -v k="${R[$w.rss]}" 'BEGIN { printf "%.1f", k / 1024 }')"; done; echo
printf '| descriptors open at the end of the ramp |'; for w in "${!BIN[@]}"; do printf ' %s |' "${R[$w.open]}"; done; echo
printf '| silent sockets closed by the server |'; for w in "${!BIN[@]}"; do printf ' %s of %s |' "$(col "$w.flood" 2)" "$(col "$w.flood" 1)"; done; echo
printf '| /healthz p50 / p99 ms, admin port flooded |'; for w in "${!BIN[@]}"; do printf ' %s / %s |' "$(col "$w.healthz" 1)" "$(col "$w.healthz" 2)"; done; echo
printf '| /healthz failures of 100 |'; for w in "${!BIN[@]}"; do printf ' %s |' "$(col "$w.healthz" 3)"; done; echo
if [ -n "$BASELINE" ]; then
  awk -v a="$(col current.flooded 1)" -v b="$(col baseline.flooded 1)" -v c="$(col current.flooded 2)" -v d="$(col baseline.flooded 2)" \
    'BEGIN { printf "\nbeside the flood, current / baseline: req/s %.2f, p99 %.2f\n", a/b, c/d }'
fi
