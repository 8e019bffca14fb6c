# Shared by the benchmark scripts (source it): tools from Debian, a release build, a scratch
# directory that is removed with every started process on exit.
export PATH="$PATH:/usr/sbin"

# need COMMAND:PACKAGE...: installs the packages whose command is missing.
need() {
  local missing=()
  for pair in "$@"; do command -v "${pair%%:*}" >/dev/null || missing+=("${pair##*:}"); done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

WORK=$(mktemp -d)
# nginx workers run unprivileged and must read the bodies.
chmod 755 "$WORK"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# wait_ready ADMIN_PORT: until tokengate's /readyz answers 200 (about 10 s at most).
wait_ready() {
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "tokengate did not become ready" >&2
  return 1
}

# start_origin SERVERS: the origin a benchmark proxies to, one nginx worker with its access log
# off and keep-alive without limit, serving the nginx server blocks SERVERS ($WORK/origin.conf);
# its PID is ORIGIN_PID and joins PIDS.
start_origin() {
  mkdir -p "$WORK/logs"
  cat > "$WORK/origin.conf" <<CONF
worker_processes 1;
pid $WORK/origin.pid;
error_log $WORK/logs/origin.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
$1
}
CONF
  nginx -c "$WORK/origin.conf" -g 'daemon off;' & ORIGIN_PID=$!; PIDS+=("$ORIGIN_PID")
}

# random_token N: N random base64url characters, the access token every proxy sends.
random_token() {
  python3 -c 'import secrets, sys; n = int(sys.argv[1]); print(secrets.token_urlsafe(n)[:n])' "$1"
}

# origin_pki: a private CA ($WORK/ca.pem) and an origin certificate for 127.0.0.1 and localhost
# ($WORK/origin.pem, $WORK/origin.key), readable by nginx's workers.
origin_pki() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$WORK/origin.key" -out "$WORK/origin.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > "$WORK/san.ext"
  openssl x509 -req -in "$WORK/origin.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial -days 2 \
    -extfile "$WORK/san.ext" -out "$WORK/origin.pem" 2>/dev/null
  chmod 644 "$WORK"/*.pem "$WORK"/*.key
}
