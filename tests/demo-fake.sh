#!/usr/bin/env bash
# A walk-through of vfctl on a fake host tree (no privileges, no QEMU).
set -euo pipefail
V=${VFCTL:-target/release/vfctl}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
step() { printf '\n\033[1m$ vfctl %s\033[0m\n' "$*"; "$V" --direct --fake-kernel --root "$dir/host" --config "$dir/config.toml" "$@" || echo "(exit $?)"; }
printf 'manage = ["8086:10c9", "1b36:0010"]\n' > "$dir/config.toml"
"$V" fake-host "$dir/host" --layout demo
step check
step list
step enable 0000:3b:00.0
step bind 0000:3b:00.4
step bind 0000:3b:00.0
step bind 0000:3b:00.0 --whole-group
step unbind 0000:3b:00.0 --whole-group
step enable 0000:01:00.0 --vfs 9
step list --output json
