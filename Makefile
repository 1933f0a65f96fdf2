# One target per concern. `make test` is what CI runs (.ci/run) and what a new user runs.
SHELL := /bin/bash
CARGO ?= cargo
TESTBED := $(or $(CARGO_TARGET_DIR),target)/debug/atlas-testbed
# The binary the bed's image is built around (from the Dockerfile, by buildah).
IMAGE_BINARY := $(or $(CARGO_TARGET_DIR),target)/release/atlas-runner

.PHONY: test testbed lint build crds chart reference docs clean-testbed run

## test: install the real parts (cached), lint, then run every test against one shared bed: a
## cluster with a node that runs our image (built from the Dockerfile around the release binary)
test: testbed lint
	$(CARGO) build --workspace --all-targets --locked
	$(CARGO) build --release --locked --bin atlas-runner
	$(TESTBED) run --nodes --image-binary $(IMAGE_BINARY) -- $(CARGO) test --workspace --locked

## testbed: build and cache the bed's parts (Kubernetes, containerd, CoreDNS, etcd, helm, SeaweedFS, the
## node's images, hadolint...) under ~/.cache/atlas-runner
testbed:
	scripts/testbed-install.sh

## lint: formatting and clippy with warnings as errors (hadolint on the Dockerfile is a test: tests/dockerfile.rs)
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
	rm -rf $${ATLAS_TEST_BIN:-$$HOME/.cache/atlas-runner/test-bin} $$HOME/.cache/atlas-runner/build $$HOME/.cache/atlas-runner/containers

## run: the standalone runner on the vanilla example (downloads Mojang's server; DATA=./data by default)
DATA ?= ./data
run:
	$(CARGO) run --release --locked -- run --spec examples/vanilla.yaml --data $(DATA)
