#!/usr/bin/env bash
# Builds the Go example offline from Debian's packages (GOPATH mode, GO111MODULE=off):
# generates the stubs from ../../protos with protoc into _build/, builds _build/bin/twinkle-sched,
# and with --test also runs go vet and the unit tests. --gen-only writes the stubs into gen/
# for module mode (go.mod) instead. Needs go, protoc, protoc-gen-go, protoc-gen-go-grpc.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PROTOS="$(cd "$HERE/../../protos" && pwd)"
MODULE=example.com/twinkle
PKG="$MODULE/gen/twinkle/worker/v1;workerv1"
BUILD="${TWINKLE_GO_BUILD:-$HERE/_build}"  # "_": go ./... patterns skip it in module mode

generate() {  # generate OUT_DIR: the stubs of worker.proto and tensor.proto under OUT_DIR/gen/twinkle/worker/v1
    local out="$1"
    local maps=(--go_opt="Mtwinkle/worker/v1/worker.proto=$PKG" --go_opt="Mtwinkle/worker/v1/tensor.proto=$PKG"
        --go-grpc_opt="Mtwinkle/worker/v1/worker.proto=$PKG" --go-grpc_opt="Mtwinkle/worker/v1/tensor.proto=$PKG")
    mkdir -p "$out/gen"
    protoc -I "$PROTOS" --go_out="$out/gen" --go_opt=paths=source_relative \
        --go-grpc_out="$out/gen" --go-grpc_opt=paths=source_relative "${maps[@]}" \
        twinkle/worker/v1/worker.proto twinkle/worker/v1/tensor.proto
}

if [ "${1:-}" = "--gen-only" ]; then
    rm -rf "$HERE/gen"
    generate "$HERE"
    exit 0
fi

# A GOPATH with this module's sources copied in (GOPATH mode does not follow symlinked packages).
SRC="$BUILD/gopath/src/$MODULE"
rm -rf "$SRC"
mkdir -p "$SRC" "$BUILD/bin"
cp "$HERE"/*.go "$SRC"/
cp -r "$HERE/cmd" "$SRC"/
generate "$SRC"
export GO111MODULE=off GOPATH="$BUILD/gopath:/usr/share/gocode" GOFLAGS=-mod=
cd "$SRC"
go build -o "$BUILD/bin/twinkle-sched" ./cmd/twinkle-sched
if [ "${1:-}" = "--test" ]; then
    go vet ./...
    go test ./...
fi
echo "built $BUILD/bin/twinkle-sched"
