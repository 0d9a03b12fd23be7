#!/usr/bin/env bash
# Lints protos/ and checks them for breaking changes against the last released
# contract (.buf/released/), with buf from npm (examples/node/package-lock.json
# pins it; it runs offline once installed). CI runs this script.
#
#   scripts/buf_checks.sh                    install if needed, lint, breaking check
#   scripts/buf_checks.sh --update-baseline  at a release: copy protos/ to .buf/released/
#
# BUF_BREAKING_AGAINST overrides the baseline with any buf input, e.g.
#   BUF_BREAKING_AGAINST='.git#tag=v0.2.0,subdir=protos' scripts/buf_checks.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
node_dir="$root/examples/node"
buf="$node_dir/node_modules/.bin/buf"
baseline=".buf/released"
cd "$root"

if [[ "${1:-}" == "--update-baseline" ]]; then
  rm -rf "$baseline/twinkle"
  mkdir -p "$baseline"
  cp -r protos/twinkle "$baseline/"
  echo "buf_checks: $baseline now holds the protos of this tree; commit it with the release."
  exit 0
fi

# The lock file pins buf and the Node client's packages; reinstall when it changed.
if [[ ! -x "$buf" || "$node_dir/package-lock.json" -nt "$node_dir/node_modules/.package-lock.json" ]]; then
  echo "buf_checks: npm ci in examples/node"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "buf_checks: $("$buf" --version) lint protos/ (buf.yaml)"
"$buf" lint

against="${BUF_BREAKING_AGAINST:-$baseline}"
echo "buf_checks: breaking protos/ against $against"
"$buf" breaking protos --against "$against"

echo "buf_checks: lint and breaking checks passed"
