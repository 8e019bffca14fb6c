#!/usr/bin/env bash
# Soak: two replicas sharing Redis under steady load while the IdP (down, then hanging), Redis,
# the upstream and a replica fail on a schedule (benches/soak.py says which, and when).
#
#   bash benches/soak.sh [--scale F]     # F stretches the 130 s schedule (default 1)
#
# Prints what clients got in each phase; it never fails on a number.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) SCALE=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. benches/lib.sh
need redis-server:redis-server python3:python3 curl:curl
cargo build --release --quiet
python3 benches/soak.py "$PWD/target/release/tokengate" "$WORK" "$SCALE"
