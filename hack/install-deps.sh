#!/usr/bin/env bash
# Installs everything Shoal's tests, benchmarks and demo need on a fresh Debian machine, as root:
# Debian packages, Go tools, containerd 2.x, and the Kubernetes commands built from the Go module
# proxy (the API server for envtest, kubelet and the rest for the local cluster).
# Idempotent and quiet when everything is already there. Heavy artefacts live outside the repo,
# under $SHOAL_CACHE (default ~/.cache/shoal).
set -euo pipefail

CACHE=${SHOAL_CACHE:-$HOME/.cache/shoal}
K8S_VERSION=${K8S_VERSION:-1.37.1}
CONTROLLER_GEN_VERSION=v0.23.0
GOLANGCI_LINT_VERSION=v2.15.0
HELM_VERSION=v3.22.0
OCI_CONFORMANCE_VERSION=v0.0.0-20260831232431-97274622c111
CONTAINERD2_VERSION=${CONTAINERD2_VERSION:-v2.4.2}
BIN="$CACHE/bin"
ENVTEST_DIR="$CACHE/k8s/$K8S_VERSION"

log() { echo "install-deps: $*" >&2; }

apt_packages=(containerd runc docker-registry etcd-server iproute2 busybox-static util-linux procps psmisc
  containernetworking-plugins)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packaged services are not ours to run: the tests start their own instances.
  for svc in containerd docker-registry etcd; do
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
fi

mkdir -p "$BIN" "$ENVTEST_DIR"
go_tool() { # name module version
  local name=$1 module=$2 version=$3 stamp="$BIN/.$1-$3"
  [ -x "$BIN/$name" ] && [ -f "$stamp" ] && return 0
  log "go install $module@$version"
  GOBIN="$BIN" CGO_ENABLED=0 go install "$module@$version"
  touch "$stamp"
}
go_tool controller-gen sigs.k8s.io/controller-tools/cmd/controller-gen "$CONTROLLER_GEN_VERSION"
go_tool golangci-lint github.com/golangci/golangci-lint/v2/cmd/golangci-lint "$GOLANGCI_LINT_VERSION"
go_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"

# The OCI distribution-spec conformance suite, which test/e2e runs against the mirror. Its module
# (the repository's conformance/ directory) has no tags of its own, and the module proxy serves
# one pseudo-version of it (go list -m -versions lists none; @latest resolves to this one).
oci_conformance_stamp="$BIN/.oci-conformance-$OCI_CONFORMANCE_VERSION"
if [ ! -x "$BIN/oci-conformance" ] || [ ! -f "$oci_conformance_stamp" ]; then
  log "go install github.com/opencontainers/distribution-spec/conformance@$OCI_CONFORMANCE_VERSION"
  oci_conformance_out=$(mktemp -d)
  GOBIN="$oci_conformance_out" CGO_ENABLED=0 go install -ldflags "-X main.Version=$OCI_CONFORMANCE_VERSION" \
    "github.com/opencontainers/distribution-spec/conformance@$OCI_CONFORMANCE_VERSION"
  mv "$oci_conformance_out/conformance" "$BIN/oci-conformance"
  rm -rf "$oci_conformance_out"
  touch "$oci_conformance_stamp"
fi

# containerd 2.x, the runtime of current Kubernetes releases, next to Debian's 1.6: the tests that
# need its CRI behaviour (pinned images) run their nodes on it. Static, without the snapshotters
# that need cgo or kernel features this machine lacks.
CONTAINERD2_DIR="$CACHE/containerd/$CONTAINERD2_VERSION"
if [ ! -x "$CONTAINERD2_DIR/containerd" ] || [ ! -x "$CONTAINERD2_DIR/containerd-shim-runc-v2" ]; then
  log "building containerd $CONTAINERD2_VERSION (a few minutes, once)"
  mkdir -p "$CONTAINERD2_DIR"
  containerd_out=$(mktemp -d)
  for cmd in containerd containerd-shim-runc-v2; do
    GOBIN="$containerd_out" CGO_ENABLED=0 GOFLAGS=-mod=mod go install -tags no_btrfs,no_devmapper,no_zfs \
      -ldflags "-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD2_VERSION" \
      "github.com/containerd/containerd/v2/cmd/$cmd@$CONTAINERD2_VERSION"
  done
  mv "$containerd_out"/* "$CONTAINERD2_DIR/"
  rm -rf "$containerd_out"
fi

# Kubernetes has no Debian packages: build its commands from the module proxy in a throwaway
# module that requires k8s.io/kubernetes and points every staging module at its published v0 twin.
# kube-apiserver serves envtest; the rest run the local cluster (test/cluster, make demo).
k8s_commands=(kube-apiserver kubelet kube-scheduler kube-controller-manager kubectl)
k8s_missing=()
for c in "${k8s_commands[@]}"; do
  [ -x "$ENVTEST_DIR/$c" ] || k8s_missing+=("$c")
done
if [ ${#k8s_missing[@]} -gt 0 ]; then
  log "building ${k8s_missing[*]} v$K8S_VERSION (several minutes, once)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  if ! (
    cd "$work"
    go mod init shoal.local/kubernetes-build
    staging_version="v0.${K8S_VERSION#1.}"
    modfile=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    # Point each staging module at its published twin; a few (samples) are never published.
    grep -E '^\s+k8s\.io/[a-z0-9-]+ => \./staging/' "$modfile" | awk '{print $1}' | while read -r m; do
      if go mod download "$m@$staging_version"; then
        go mod edit -replace "$m=$m@$staging_version"
      fi
    done
    go mod edit -require "k8s.io/kubernetes@v$K8S_VERSION"
    {
      printf 'package main\nimport (\n'
      for c in "${k8s_missing[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s/app"\n' "$c"; done
      printf ')\nfunc main() {}\n'
    } > keep.go
    sed -i 's|_ "k8s.io/kubernetes/cmd/kubectl/app"|_ "k8s.io/kubectl/pkg/cmd"|' keep.go
    go mod tidy
    k8s_minor=$(echo "$K8S_VERSION" | cut -d. -f2)
    pkgs=()
    for c in "${k8s_missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
    # Without the version stamp the commands report v0.0.0-master, which kubelet's registration
    # and kubectl's skew checks trip over.
    CGO_ENABLED=0 go build -o "$work/out/" \
      -ldflags "-X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$k8s_minor" \
      "${pkgs[@]}"
  ) >"$work/build.log" 2>&1; then
    grep -v '^go: downloading' "$work/build.log" | tail -30 >&2
    log "Kubernetes build failed (full log above)"
    exit 1
  fi
  for c in "${k8s_missing[@]}"; do
    mv "$work/out/$c" "$ENVTEST_DIR/$c.tmp.$$" # unique: two runs at once do not collide
    mv "$ENVTEST_DIR/$c.tmp.$$" "$ENVTEST_DIR/$c"
  done
fi
ln -sf "$(command -v etcd || echo /usr/bin/etcd)" "$ENVTEST_DIR/etcd"
