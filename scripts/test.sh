#!/usr/bin/env bash
# The test command (README, CI): installs the project with its test tools, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[worker,demo,dev,otel]'
if [ -f examples/node/package.json ]; then (cd examples/node && npm ci --silent --no-audit --no-fund); fi
python3 -m pytest "$@"
