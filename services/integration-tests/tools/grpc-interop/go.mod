// grpc-go's own interop cases (package google.golang.org/grpc/interop) for
// tests/grpc_interop.rs; deploy/local/install-deps.sh --test builds the
// driver in this directory into target/tools/grpc-interop.
module meshkit.io/integration-tests/tools/grpc-interop

go 1.24.0

require google.golang.org/grpc v1.80.0

require (
	cloud.google.com/go/compute/metadata v0.9.0 // indirect
	github.com/cncf/xds/go v0.0.0-20251210132809-ee656c7534f5 // indirect
	github.com/envoyproxy/protoc-gen-validate v1.3.0 // indirect
	golang.org/x/net v0.49.0 // indirect
	golang.org/x/oauth2 v0.34.0 // indirect
	golang.org/x/sys v0.40.0 // indirect
	golang.org/x/text v0.33.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260120221211-b8f7ae30c516 // indirect
	google.golang.org/protobuf v1.36.11 // indirect
)
