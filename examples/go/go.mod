module example.com/twinkle

// Module mode, for a user with the Go module proxy: ./build.sh --gen-only && go mod tidy && go build ./...
// (go mod tidy writes go.sum and the indirect requirements). Offline, build.sh builds the same
// code in GOPATH mode against Debian's grpc-go 1.33 and protobuf 1.28 instead.

go 1.23

require (
	google.golang.org/grpc v1.73.0
	google.golang.org/protobuf v1.36.6
)
