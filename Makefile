# meshkit: `make up` starts a local cluster, `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: help up down status deps build build-release test test-fast interop lint fmt bench clean-run

help: ## list the targets
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

up: ## install what is missing, build, start etcd, a Kafka broker, 2 instances of each service (scheduler too) and the gateway
	@if deploy/local/cluster.sh docker-ok; then \
	  deploy/local/cluster.sh compose-up; \
	else \
	  $(MAKE) --no-print-directory deps build-release && deploy/local/cluster.sh up; \
	fi

down: ## stop the local cluster; no process is left behind
	@deploy/local/cluster.sh down

status: ## show the local cluster's processes and registrations
	@deploy/local/cluster.sh status

deps: ## install what is missing (etcd, protoc, grpcurl, the Tansu broker)
	@deploy/local/install-deps.sh

build: ## debug build of every crate and binary
	$(CARGO) build --workspace --bins

build-release: ## release build of every binary (services, bench)
	$(CARGO) build --release --workspace --bins

test: ## the whole suite: unit and integration tests on real etcd, Tansu and PostgreSQL, then interop
	@deploy/local/install-deps.sh --test
	$(CARGO) build --workspace --bins
	@mkdir -p target
	@set -o pipefail; $(CARGO) test --workspace --no-fail-fast 2>&1 | tee target/test.log; status=$$?; \
	  awk '/^test result:/ {p += $$4; f += $$6} END {printf "%d passed, %d failed\n", p, f}' target/test.log; \
	  deploy/local/interop.sh --own-cluster || status=1; \
	  deploy/check-manifests.sh || status=1; \
	  exit $$status

interop: ## grpcurl, Python, grpc-web and Java clients and a Python instance against the `make up` cluster
	@deploy/local/interop.sh

test-fast: ## inner loop: unit tests only, no etcd or database
	$(CARGO) test --workspace --exclude meshkit-integration-tests

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

bench: ## benchmarks (release build, nginx as a yardstick); figures go in docs/BENCHMARKS.md
	@deploy/local/install-deps.sh --bench
	$(CARGO) build --release --workspace --bins
	$(CARGO) run --release -p meshkit-integration-tests --bin mesh-bench

clean-run: down ## remove the local cluster's data and logs
	rm -rf .run
