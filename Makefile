# One target per concern. `make test` is what CI runs (.ci/run) and what a new user runs.
SHELL := /bin/bash
CARGO ?= cargo
TESTBED := $(or $(CARGO_TARGET_DIR),target)/debug/atlas-testbed

.PHONY: test testbed lint build crds chart reference docs clean-testbed run

## test: install the real parts (cached), lint, then run every test against one shared bed
test: testbed lint
	$(CARGO) build --workspace --all-targets --locked
	$(TESTBED) run -- $(CARGO) test --workspace --locked

## testbed: build and cache etcd, kube-apiserver, kubectl, helm, SeaweedFS, promtool (~/.cache/atlas-runner)
testbed:
	scripts/testbed-install.sh

## lint: formatting and clippy with warnings as errors
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

build:
	$(CARGO) build --release --locked

## crds: regenerate the committed CRD (crds/ and the chart's copy) from src/api
crds:
	$(CARGO) run --quiet --locked -- crd > crds/minecraftservers.atlas.dev.yaml
	cp crds/minecraftservers.atlas.dev.yaml charts/atlas-runner/crds/minecraftservers.atlas.dev.yaml

## reference: regenerate the book's reference pages (docs/reference/) from the code; a test fails when they are stale
reference:
	$(CARGO) run --quiet --locked -- reference --out docs/reference

## docs: build the book into target/book (mdbook from the test bed's cache; `make test` also checks its links)
docs: testbed
	$${ATLAS_TEST_BIN:-$$HOME/.cache/atlas-runner/test-bin}/mdbook build docs

## chart: lint the Helm chart
chart: testbed
	$${ATLAS_TEST_BIN:-$$HOME/.cache/atlas-runner/test-bin}/helm lint --strict charts/atlas-runner

## clean-testbed: forget the cached test-bed binaries (the next `make test` rebuilds them)
clean-testbed:
	rm -rf $${ATLAS_TEST_BIN:-$$HOME/.cache/atlas-runner/test-bin} $$HOME/.cache/atlas-runner/build

## run: the standalone runner on the vanilla example (downloads Mojang's server; DATA=./data by default)
DATA ?= ./data
run:
	$(CARGO) run --release --locked -- run --spec examples/vanilla.yaml --data $(DATA)
