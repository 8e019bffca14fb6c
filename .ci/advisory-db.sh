#!/usr/bin/env bash
# cargo-deny reads its advisory database from a git checkout, but the copy in ../shared is a
# plain directory (the git host is unreachable here). Make a local git snapshot of it under
# target/advisory-db, where deny.toml points.
set -euo pipefail
cd "$(dirname "$0")/.."
src=../shared/advisory-db
dst=target/advisory-db
[ -d "$src" ] || { echo "advisory database copy not found at $src" >&2; exit 1; }
rm -rf "$dst"
mkdir -p "$dst"
for db in "$src"/advisory-db-*; do
  name=$(basename "$db")
  cp -R "$db" "$dst/$name"
  chmod -R u+w "$dst/$name"
  git -C "$dst/$name" init -q
  git -C "$dst/$name" add -A
  git -C "$dst/$name" -c user.name=tokengate-ci -c user.email=ci@localhost commit -qm "advisory-db snapshot"
done
