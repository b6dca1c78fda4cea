# meshkit: `make up` starts a local cluster, `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
# The profile `make up` builds and runs: dev builds in a few minutes and is
# what `make test` builds too, so the two share one build. `release` (thin
# LTO, what `make bench` measures) takes several times longer.
export MESHKIT_PROFILE ?= dev
PHASE := deploy/local/phase.sh

.PHONY: help up down status deps build build-release test test-system test-fast interop lint arch-check fmt bench fuzz soak clean-run check-fresh check-fresh-test

help: ## list the targets
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

up: ## install what is missing, build, start etcd, a Kafka broker, 2 instances of each service (scheduler too) and the gateway
	@if deploy/local/cluster.sh docker-ok; then \
	  deploy/local/cluster.sh compose-up; \
	else \
	  $(PHASE) install deploy/local/install-deps.sh && \
	  $(PHASE) build $(MAKE) --no-print-directory build && \
	  $(PHASE) start deploy/local/cluster.sh up; \
	fi

down: ## stop the local cluster; no process is left behind
	@deploy/local/cluster.sh down

status: ## show the local cluster's processes and registrations
	@deploy/local/cluster.sh status

deps: ## install what is missing (etcd, protoc and its include files, grpcurl, Java, Maven and Apache Kafka's jars)
	@deploy/local/install-deps.sh

build: ## every binary, in the profile `make up` runs (dev; MESHKIT_PROFILE=release: optimised)
	$(CARGO) build --profile $(MESHKIT_PROFILE) --workspace --bins

build-release: ## release build of every binary (services, bench)
	$(CARGO) build --release --workspace --bins

test: ## the whole suite: unit and integration tests on real etcd, Apache Kafka and PostgreSQL, then interop
	@$(PHASE) install deploy/local/install-deps.sh --test
	@$(PHASE) build $(MAKE) --no-print-directory build MESHKIT_PROFILE=dev
	@mkdir -p target
	@set -o pipefail; $(PHASE) "cargo test" bash -c 'set -o pipefail; $(CARGO) test --workspace --no-fail-fast 2>&1 | tee target/test.log'; status=$$?; \
	  awk '/^test result:/ {p += $$4; f += $$6} END {printf "%d passed, %d failed\n", p, f}' target/test.log; \
	  $(PHASE) "java tests" bash -c 'set -o pipefail; mvn -B -f common/java/pom.xml -pl spring,../../services/user-spring -am test 2>&1 \
	    | tee target/java-test.log | grep -E "^\[(ERROR|WARNING)\] Tests run:|Tests run:.*Fail|BUILD (SUCCESS|FAILURE)" | tail -4' || status=1; \
	  MESHKIT_PROFILE=dev $(PHASE) interop deploy/local/interop.sh --own-cluster || status=1; \
	  $(PHASE) fuzz deploy/local/fuzz.sh 15 || status=1; \
	  $(PHASE) manifests deploy/check-manifests.sh || status=1; \
	  exit $$status

test-system: ## the slow tier: 3-node Kafka and 3-member etcd clusters losing leaders and quorum, `make up` with TLS and with 3 etcd members, hosts cut off from each other in network namespaces
	@$(PHASE) install deploy/local/install-deps.sh --test
	@$(PHASE) build $(MAKE) --no-print-directory build MESHKIT_PROFILE=dev
	@$(PHASE) "kafka cluster" $(CARGO) test -p meshkit-integration-tests --test events -- --ignored --test-threads=1
	@$(PHASE) "etcd cluster" $(CARGO) test -p meshkit-integration-tests --test etcd_cluster -- --ignored --test-threads=1
	@$(PHASE) "etcd cluster on Debian's 3.4" env MESHKIT_TEST_ETCD="$$(command -v etcd)" \
	  $(CARGO) test -p meshkit-integration-tests --test etcd_cluster -- --ignored --test-threads=1
	@$(PHASE) "local cluster (TLS; 3 etcd members)" $(CARGO) test -p meshkit-integration-tests --test local_cluster -- --ignored --test-threads=1
	@$(PHASE) "partitions (network namespaces)" $(CARGO) test -p meshkit-integration-tests --test partitions -- --ignored --test-threads=1

soak: ## the local cluster under steady load through the gateway with a rolling restart every minute, SOAK_SECS long (default 1800); samples in target/soak, plotted to docs/soak.png
	@deploy/local/install-deps.sh --soak
	@$(PHASE) build $(MAKE) --no-print-directory build MESHKIT_PROFILE=dev
	@$(PHASE) soak env MESHKIT_SOAK_SECS=$(or $(SOAK_SECS),1800) $(CARGO) test -p meshkit-integration-tests --test soak -- --nocapture
	@python3 deploy/local/soak-plot.py target/soak docs/soak.png

fuzz: ## every fuzz target (cargo fuzz, libFuzzer) for FUZZ_SECS each (default 300); make test runs them 15 s each
	@deploy/local/install-deps.sh --test
	@$(PHASE) fuzz deploy/local/fuzz.sh $(or $(FUZZ_SECS),300)

interop: ## grpcurl, Python, grpc-web and Java clients and a Python instance against the `make up` cluster
	@deploy/local/interop.sh

test-fast: ## inner loop: unit tests only, no etcd or database
	$(CARGO) test --workspace --exclude meshkit-integration-tests

lint: ## rustfmt check, clippy with warnings as errors, and the dependency rules
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@deploy/local/arch-check.sh

arch-check: ## the crate graph's rules (docs/ARCHITECTURE.md): layers, no cycles, no unused dependency, no sea-orm or rskafka where unused
	@deploy/local/arch-check.sh

fmt: ## format the code
	$(CARGO) fmt --all

bench: ## benchmarks (release build, nginx as a yardstick); figures go in docs/BENCHMARKS.md
	@deploy/local/install-deps.sh --bench
	$(CARGO) build --release --workspace --bins
	$(CARGO) run --release -p meshkit-integration-tests --bin mesh-bench

check-fresh: ## `make up` on a clean Debian root (debootstrap) with this machine's toolchains: catches a missing install step; FRESH_ARGS=--java adds MESHKIT_JAVA=1
	deploy/local/fresh-root.sh $(FRESH_ARGS)

check-fresh-test: ## as check-fresh, then `make test` in that root too (slow: the whole suite)
	deploy/local/fresh-root.sh --test $(FRESH_ARGS)

clean-run: down ## remove the local cluster's data and logs
	@deploy/local/cluster.sh clean
