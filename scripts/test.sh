#!/usr/bin/env bash
# The test command (README, CI): installs the project with its test tools, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[worker,demo,dev,otel]'
if [ -f examples/node/package.json ]; then (cd examples/node && npm ci --silent --no-audit --no-fund); fi

# The Go scheduler (examples/go) builds offline from Debian's packages; install them when missing.
GO_PACKAGES=(golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
    protoc-gen-go protoc-gen-go-grpc protobuf-compiler)
if ! command -v go >/dev/null || ! dpkg -s "${GO_PACKAGES[@]}" >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "scripts/test.sh: the Go packages are missing; as root: apt-get install -y ${GO_PACKAGES[*]}" >&2
        exit 1
    fi
    apt-get update -qq || echo "scripts/test.sh: apt-get update failed; trying the install with the lists at hand" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${GO_PACKAGES[@]}" >/dev/null; then
        echo "scripts/test.sh: apt-get install ${GO_PACKAGES[*]} failed: the Go tests cannot run" >&2
        exit 1
    fi
fi
bash examples/go/build.sh --test  # protoc stubs, go build, go vet, go test
export TWINKLE_REQUIRE_GO=1       # tests/cross_language/test_go_scheduler.py fails instead of skipping

python3 -m pytest "$@"
