// protovalidate's conformance runner, pinned for tests/validation.rs: it
// drives target/debug/protovalidate-executor through protovalidate's own
// cases; deploy/local/install-deps.sh --test builds it into
// target/tools/protovalidate-conformance.
module meshkit.io/integration-tests/tools/protovalidate-conformance

go 1.25.8

require github.com/bufbuild/protovalidate/tools v1.2.2

require (
	github.com/spf13/pflag v1.0.10 // indirect
	google.golang.org/protobuf v1.36.11 // indirect
	gopkg.in/yaml.v3 v3.0.1 // indirect
)
