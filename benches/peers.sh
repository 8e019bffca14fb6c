#!/usr/bin/env bash
# tokengate against nginx and HAProxy doing the same job (set a static Authorization header and
# proxy to one origin), plus the origin directly, on this machine, in one run.
#
#   bash benches/peers.sh [--workers N] [--rounds R] [--duration SECONDS] [--connections C] [--access-log] [--tls]
#                         [--token-bytes N] [--peer-headers same|none] [--syscalls]
#
# The access token every proxy sends is N random base64url characters (default 1200, the size of a
# Keycloak or Entra access token; a short opaque token hides what a proxy pays per request to send
# the header, HTTP/2's HPACK coding above all).
#
# --tls makes the origin HTTPS (a private CA made here, HTTP/2 by ALPN) and every proxy verify it:
# nginx `proxy_pass https://` with upstream keepalive, proxy_ssl_verify and session reuse; HAProxy
# `ssl verify required` with `http-reuse always`, once with alpn h2,http/1.1 (haproxy) and once
# with alpn http/1.1 (haproxy-h1); tokengate its route `ca_file`. "direct" is wrk against the
# origin's TLS port.
#
# --baseline-bin PATH runs another tokengate binary (an earlier build) beside this one as the peer
# tokengate-base, with the same configuration on its own ports. --protocol and --baseline-protocol
# set the route's upstream_protocol (http1 or auto) of tokengate and tokengate-base; with
# --baseline-protocol alone, tokengate-base is this binary.
#
# --peer-headers same (the default) has nginx and HAProxy add the forwarding headers tokengate
# adds to every request (X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, Via and a fresh
# X-Request-Id), so every proxy does the same work and the origin parses the same head; checked
# before the runs. --peer-headers none is the older setup: only Authorization is set.
#
# --syscalls adds, after the rounds, one more run of each proxy at 100 B counted by `perf stat`:
# system calls per request and CPU per request split into user and kernel time (perf record -g
# on the same setup says where the kernel time goes).
#
# --access-log turns on each proxy's access log as it writes it by default, to a file: nginx the
# combined format, HAProxy httplog to its log file, tokengate its text lines. The lines tokengate
# wrote are counted against the requests it answered.
#
# Prints a markdown table of median requests/s, p50 and p99 latency, and ratios against direct and
# against nginx, CPU seconds per 10k requests of every proxy, and tokengate's RSS. It compares; it never
# fails on a number.
set -euo pipefail
cd "$(dirname "$0")/.."

WORKERS=1 ROUNDS=3 DURATION=8 CONNECTIONS=50 ACCESS_LOG=0 TLS=0 BASELINE_BIN= PROTOCOL= BASE_PROTOCOL= TOKEN_BYTES=1200
PEER_HEADERS=same SYSCALLS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --access-log) ACCESS_LOG=1; shift ;;
    --tls) TLS=1; shift ;;
    --baseline-bin) BASELINE_BIN=$2; shift 2 ;;
    --protocol) PROTOCOL=$2; shift 2 ;;
    --baseline-protocol) BASE_PROTOCOL=$2; shift 2 ;;
    --token-bytes) TOKEN_BYTES=$2; shift 2 ;;
    --peer-headers) PEER_HEADERS=$2; shift 2 ;;
    --syscalls) SYSCALLS=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

. benches/lib.sh
need nginx:nginx haproxy:haproxy wrk:wrk h2load:nghttp2-client curl:curl python3:python3
[ "$SYSCALLS" = 1 ] && need perf:linux-perf
cargo build --release --quiet
TOKEN=$(random_token "$TOKEN_BYTES")

ORIGIN=18000 NGINX=18001 HAPROXY=18002 TOKENGATE=18003 TG_ADMIN=18004 ORIGIN_TLS=18005 HAPROXY_H1=18006 TG_BASE=18007 TG_BASE_ADMIN=18008
mkdir -p "$WORK/www" "$WORK/logs"
head -c 100 /dev/zero | tr '\0' 'x' > "$WORK/www/small"
head -c 16384 /dev/zero | tr '\0' 'y' > "$WORK/www/large"

ORIGIN_TLS_SERVER=""
if [ "$TLS" = 1 ]; then
  origin_pki
  ORIGIN_TLS_SERVER="server {
    listen 127.0.0.1:$ORIGIN_TLS ssl http2 reuseport;
    ssl_certificate $WORK/origin.pem;
    ssl_certificate_key $WORK/origin.key;
    ssl_session_cache shared:origin:10m;
    root $WORK/www;
    location = /whoami { default_type text/plain; return 200 \"\$http_authorization\"; }
    location = /forwarded { default_type text/plain; return 200 \"\$http_x_forwarded_for|\$http_x_forwarded_proto|\$http_x_forwarded_host|\$http_via|\$http_x_request_id\"; }
  }"
  NGINX_UPSTREAM="upstream origin { server 127.0.0.1:$ORIGIN_TLS; keepalive 128; }"
  NGINX_PASS="proxy_pass https://origin;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $WORK/ca.pem;
      proxy_ssl_name localhost;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;"
  HAPROXY_SERVER="server o1 127.0.0.1:$ORIGIN_TLS ssl verify required ca-file $WORK/ca.pem verifyhost localhost sni str(localhost)"
  TG_UPSTREAM="https://127.0.0.1:$ORIGIN_TLS
    ca_file: $WORK/ca.pem"
  DIRECT_URL="https://127.0.0.1:$ORIGIN_TLS"
  PEERS="direct nginx haproxy haproxy-h1 tokengate"
else
  NGINX_UPSTREAM="upstream origin { server 127.0.0.1:$ORIGIN; keepalive 128; }"
  NGINX_PASS="proxy_pass http://origin;"
  HAPROXY_SERVER="server o1 127.0.0.1:$ORIGIN"
  TG_UPSTREAM="http://127.0.0.1:$ORIGIN"
  DIRECT_URL="http://127.0.0.1:$ORIGIN"
  PEERS="direct nginx haproxy tokengate"
fi

# The origin: one nginx worker with static bodies, a token endpoint and an Authorization echo.
servers=$(cat <<CONF
  server {
    listen 127.0.0.1:$ORIGIN reuseport;
    root $WORK/www;
    location = /token { default_type application/json; return 200 '{"access_token":"$TOKEN","token_type":"Bearer","expires_in":3600}'; }
    location = /whoami { default_type text/plain; return 200 "\$http_authorization"; }
    location = /forwarded { default_type text/plain; return 200 "\$http_x_forwarded_for|\$http_x_forwarded_proto|\$http_x_forwarded_host|\$http_via|\$http_x_request_id"; }
  }
  $ORIGIN_TLS_SERVER
CONF
)
start_origin "$servers"

if [ "$ACCESS_LOG" = 1 ]; then
  NGINX_LOG="access_log $WORK/logs/nginx-access.log combined;"
  HAPROXY_LOG="log stdout format raw local0"
  HAPROXY_HTTPLOG="option httplog"
  TG_LOG="access_log: $WORK/logs/tokengate-access.log"
else
  NGINX_LOG="access_log off;" HAPROXY_LOG="" HAPROXY_HTTPLOG="" TG_LOG="access_log: off"
fi

case "$PEER_HEADERS" in
  same)
    NGINX_HEADERS='proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header Via "1.1 nginx";
      proxy_set_header X-Request-Id $request_id;'
    HAPROXY_HEADERS='option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request add-header Via "1.1 haproxy"
  unique-id-format %[uuid]
  unique-id-header X-Request-Id' ;;
  none) NGINX_HEADERS="" HAPROXY_HEADERS="" ;;
  *) echo "--peer-headers: same or none" >&2; exit 2 ;;
esac

cat > "$WORK/nginx.conf" <<CONF
worker_processes $WORKERS;
pid $WORK/nginx.pid;
error_log $WORK/logs/nginx.err warn;
events { worker_connections 4096; }
http {
  $NGINX_LOG
  keepalive_requests 1000000;
  $NGINX_UPSTREAM
  server {
    listen 127.0.0.1:$NGINX;
    location / {
      $NGINX_PASS
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
      $NGINX_HEADERS
    }
  }
}
CONF

cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread $WORKERS
  maxconn 4000
  $HAPROXY_LOG
defaults
  mode http
  log global
  $HAPROXY_HTTPLOG
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAPROXY
  http-request set-header Authorization "Bearer $TOKEN"
  $HAPROXY_HEADERS
  default_backend origin
backend origin
  $HAPROXY_SERVER$([ "$TLS" = 1 ] && echo " alpn h2,http/1.1")
CONF
if [ "$TLS" = 1 ]; then
  cat >> "$WORK/haproxy.cfg" <<CONF
frontend fe_h1
  bind 127.0.0.1:$HAPROXY_H1
  http-request set-header Authorization "Bearer $TOKEN"
  $HAPROXY_HEADERS
  default_backend origin_h1
backend origin_h1
  $HAPROXY_SERVER alpn http/1.1
CONF
fi

cat > "$WORK/tokengate.yaml" <<CONF
listen: 127.0.0.1:$TOKENGATE
admin:
  listen: 127.0.0.1:$TG_ADMIN
$TG_LOG
providers:
  bench:
    type: oauth2
    token_url: http://127.0.0.1:$ORIGIN/token
    client_id: bench
    client_secret: bench-secret
routes:
  - prefix: /
    upstream: $TG_UPSTREAM
    provider: bench
    strip_prefix: false
${PROTOCOL:+    upstream_protocol: $PROTOCOL}
CONF
chmod 600 "$WORK/tokengate.yaml"
[ -n "$BASE_PROTOCOL" ] && [ -z "$BASELINE_BIN" ] && BASELINE_BIN=./target/release/tokengate

nginx -c "$WORK/nginx.conf" -g 'daemon off;' & NGINX_PID=$!; PIDS+=($NGINX_PID)
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/logs/haproxy.log" 2>&1 & HAPROXY_PID=$!; PIDS+=($HAPROXY_PID)
./target/release/tokengate --log warn run --workers "$WORKERS" -c "$WORK/tokengate.yaml" 2>"$WORK/logs/tokengate.err" & TG_PID=$!; PIDS+=($TG_PID)

if [ -n "$BASELINE_BIN" ]; then
  sed -e "s/127.0.0.1:$TOKENGATE/127.0.0.1:$TG_BASE/" -e "s/127.0.0.1:$TG_ADMIN/127.0.0.1:$TG_BASE_ADMIN/" \
    -e "s/tokengate-access.log/tokengate-base-access.log/" -e "/^    upstream_protocol:/d" \
    "$WORK/tokengate.yaml" > "$WORK/tokengate-base.yaml"
  [ -n "$BASE_PROTOCOL" ] && echo "    upstream_protocol: $BASE_PROTOCOL" >> "$WORK/tokengate-base.yaml"
  chmod 600 "$WORK/tokengate-base.yaml"
  "$BASELINE_BIN" --log warn run --workers "$WORKERS" -c "$WORK/tokengate-base.yaml" 2>"$WORK/logs/tokengate-base.err" & BASE_PID=$!; PIDS+=($BASE_PID)
  wait_ready "$TG_BASE_ADMIN"
  PEERS="$PEERS tokengate-base"
fi
wait_ready "$TG_ADMIN"
declare -A URL=([direct]=$DIRECT_URL [nginx]=http://127.0.0.1:$NGINX [haproxy]=http://127.0.0.1:$HAPROXY
                [haproxy-h1]=http://127.0.0.1:$HAPROXY_H1 [tokengate]=http://127.0.0.1:$TOKENGATE
                [tokengate-base]=http://127.0.0.1:$TG_BASE)
for name in $PEERS; do
  for size in small:100 large:16384; do
    # nginx and HAProxy may still be binding their ports: a refused connection is tried again.
    for _ in $(seq 30); do
      got=$(curl -s --cacert "$WORK/ca.pem" -o /dev/null -w '%{http_code} %{size_download}' "${URL[$name]}/${size%%:*}" 2>/dev/null || curl -s -o /dev/null -w '%{http_code} %{size_download}' "${URL[$name]}/${size%%:*}" || true)
      [ "${got%% *}" != "000" ] && break
      sleep 0.1
    done
    if [ "$got" != "200 ${size##*:}" ]; then echo "$name: /${size%%:*} answered '$got'" >&2; exit 1; fi
  done
done
for name in ${PEERS#direct }; do
  got=$(curl -s "${URL[$name]}/whoami")
  if [ "$got" != "Bearer $TOKEN" ]; then
    echo "$name does not deliver the Authorization header (got: ${got:0:40}...)" >&2; cat "$WORK"/logs/* >&2; exit 1
  fi
done

if [ "$PEER_HEADERS" = same ]; then
  for name in ${PEERS#direct }; do
    got=$(curl -s "${URL[$name]}/forwarded")
    if echo "$got" | tr '|' '\n' | grep -qx ''; then
      echo "$name does not add every forwarding header (got: $got)" >&2; exit 1
    fi
  done
fi

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# A process and its children (nginx's workers), user + system ticks.
tree_ticks() { local t=0 p; for p in $1 $(ps -o pid= --ppid "$1"); do t=$((t + $(cpu_ticks "$p"))); done; echo $t; }
# Whose CPU each peer's runs are charged to ("direct" is the origin itself).
declare -A PROC=([direct]=$ORIGIN_PID [nginx]=$NGINX_PID [haproxy]=$HAPROXY_PID [haproxy-h1]=$HAPROXY_PID
                 [tokengate]=$TG_PID [tokengate-base]=${BASE_PID:-0})
idle_rss=$(rss_kib "$TG_PID")

# One wrk run: prints "requests_per_second p50_ms p99_ms requests".
run() {
  local url=$1 path=$2
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$url$path" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec/ { rps=$2 }
    /^ +50%/ { p50=ms($2) }
    /^ +99%/ { p99=ms($2) }
    /requests in/ { n=$1 }
    END { printf "%s %s %s %s\n", rps, p50, p99, n }'
}

median() { sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

declare -A RPS P50 P99
declare -A TICKS REQS
for size in small large; do
  for name in $PEERS; do : > "$WORK/$name-$size"; done
  for round in $(seq "$ROUNDS"); do
    # Interleaved A B A B so drift on the machine hits every peer alike.
    for name in $PEERS; do
      before=$(tree_ticks "${PROC[$name]}")
      read -r rps p50 p99 n < <(run "${URL[$name]}" "/$size")
      spent=$(($(tree_ticks "${PROC[$name]}") - before))
      TICKS[$name-$size]=$((${TICKS[$name-$size]:-0} + spent)); REQS[$name-$size]=$((${REQS[$name-$size]:-0} + n))
      echo "$rps $p50 $p99" >> "$WORK/$name-$size"
    done
  done
  for name in $PEERS; do
    RPS[$name-$size]=$(cut -d' ' -f1 "$WORK/$name-$size" | median)
    P50[$name-$size]=$(cut -d' ' -f2 "$WORK/$name-$size" | median)
    P99[$name-$size]=$(cut -d' ' -f3 "$WORK/$name-$size" | median)
  done
done
peak_rss=$(awk '/VmHWM/ {print $2}' "/proc/$TG_PID/status")

# 1,000 client connections, each after one request, held open while RSS is read.
held_rss=$(python3 - "$TOKENGATE" "$TG_PID" <<'PY'
import socket, sys
port, pid = int(sys.argv[1]), sys.argv[2]
conns = []
for _ in range(1000):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /small HTTP/1.1\r\nhost: localhost\r\n\r\n")
    conns.append(s)
for s in conns:
    got = b""
    while not got.endswith(b"x" * 100):
        got += s.recv(4096)
print(next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")))
PY
)
hz=$(getconf CLK_TCK)

log_mode=$([ "$ACCESS_LOG" = 1 ] && echo "access logs on" || echo "access logs off")

echo
upstream_mode=$([ "$TLS" = 1 ] && echo "HTTPS origin (HTTP/2 by ALPN)" || echo "plain http origin")
headers_mode=$([ "$PEER_HEADERS" = same ] && echo "every proxy adds X-Forwarded-*, Via, X-Request-Id" || echo "peers add no forwarding headers")
echo "### workers=$WORKERS, $CONNECTIONS connections, ${DURATION}s x $ROUNDS rounds, $upstream_mode, $log_mode, $headers_mode, ${TOKEN_BYTES}-byte token, $(nproc) cores ($(date -u +%Y-%m-%d))"
echo
echo "| response | peer | req/s (median) | p50 ms | p99 ms | vs direct | vs nginx | CPU s / 10k req |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for size in small large; do
  label=$([ $size = small ] && echo "100 B" || echo "16 KiB")
  for name in $PEERS; do
    awk -v l="$label" -v n="$name" -v r="${RPS[$name-$size]}" -v a="${P50[$name-$size]}" -v b="${P99[$name-$size]}" \
        -v d="${RPS[direct-$size]}" -v x="${RPS[nginx-$size]}" -v t="${TICKS[$name-$size]}" -v q="${REQS[$name-$size]}" -v hz="$hz" \
        'BEGIN { printf "| %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.3f |\n", l, n, r, a, b, r/d, r/x, (t/hz)/(q/10000) }'
  done
done
echo
echo "CPU is each proxy's own (user + system, nginx with its workers) over all rounds; for direct, the origin's."
# tokengate against the best other proxy, round by round (the same round's runs are seconds
# apart) and as the ratio of medians.
echo
for size in small large; do
  label=$([ $size = small ] && echo "100 B" || echo "16 KiB")
  others=$(echo "$PEERS" | tr ' ' '\n' | grep -v -e direct -e tokengate)
  if [ -n "$BASELINE_BIN" ]; then
    awk -v t="${RPS[tokengate-$size]}" -v b="${RPS[tokengate-base-$size]}" -v l="$label" \
      'BEGIN { printf "tokengate / tokengate-base, %s: ratio of medians %.2f\n", l, t/b }'
  fi
  paired=$(for name in $others; do echo "$WORK/$name-$size"; done | xargs paste -d' ' "$WORK/tokengate-$size" | awk '
    { best = 0; for (i = 4; i <= NF; i += 3) if ($i > best) best = $i; printf "%.2f ", $1 / best }')
  best_median=$(for name in $others; do echo "${RPS[$name-$size]}"; done | sort -g | tail -1)
  awk -v l="$label" -v p="$paired" -v t="${RPS[tokengate-$size]}" -v b="$best_median" \
    'BEGIN { printf "tokengate / best other proxy, %s: per round %s; ratio of medians %.2f\n", l, p, t/b }'
done
echo
tg_ticks=$((${TICKS[tokengate-small]} + ${TICKS[tokengate-large]})) tg_requests=$((${REQS[tokengate-small]} + ${REQS[tokengate-large]}))
awk -v i="$idle_rss" -v p="$peak_rss" -v h="$held_rss" -v t="$tg_ticks" -v hz="$hz" -v n="$tg_requests" \
  'BEGIN { printf "tokengate: idle RSS %.1f MiB, peak RSS under load %.1f MiB, RSS with 1,000 open connections %.1f MiB, %.3f CPU seconds per 10k requests\n", i/1024, p/1024, h/1024, (t/hz)/(n/10000) }'
if [ "$ACCESS_LOG" = 1 ]; then
  # The last lines are written within a second.
  sleep 1.5
  metrics=$(curl -s "http://127.0.0.1:$TG_ADMIN/metrics")
  served=$(echo "$metrics" | awk '/^tokengate_requests_total/ { n += $NF } END { print n + 0 }')
  logged=$(echo "$metrics" | awk '/^tokengate_access_log_lines_total/ { print $NF }')
  dropped=$(echo "$metrics" | awk '/^tokengate_access_log_dropped_total/ { print $NF }')
  echo "tokengate access log: $logged lines written for $served requests answered, $dropped dropped; $(wc -l < "$WORK/logs/tokengate-access.log") lines in the file"
fi

if [ "$SYSCALLS" = 1 ]; then
  # User and system ticks of a process tree, separately.
  split_ticks() { local u=0 k=0 p a b; for p in $1 $(ps -o pid= --ppid "$1"); do
    read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat"); u=$((u + a)); k=$((k + b)); done; echo "$u $k"; }
  echo
  echo "| peer (100 B, one ${DURATION}s run) | system calls / request | user µs / request | kernel µs / request |"
  echo "| --- | ---: | ---: | ---: |"
  for name in ${PEERS#direct }; do
    pids=$(echo "${PROC[$name]}" $(ps -o pid= --ppid "${PROC[$name]}") | tr -s ' ' ',')
    perf stat -x, -e raw_syscalls:sys_enter -o "$WORK/$name.perf" -p "$pids" & PERF_PID=$!
    read -r u0 k0 < <(split_ticks "${PROC[$name]}")
    read -r _ _ _ n < <(run "${URL[$name]}" /small)
    read -r u1 k1 < <(split_ticks "${PROC[$name]}")
    kill -INT "$PERF_PID"; wait "$PERF_PID" || true
    calls=$(awk -F, '/raw_syscalls/ {print $1}' "$WORK/$name.perf")
    awk -v n="$n" -v c="${calls:-0}" -v u=$((u1 - u0)) -v k=$((k1 - k0)) -v hz="$hz" -v p="$name" \
      'BEGIN { printf "| %s | %.2f | %.2f | %.2f |\n", p, c / n, u / hz * 1e6 / n, k / hz * 1e6 / n }'
  done
fi
