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
