#!/usr/bin/env bash
# Builds the real control plane the tests drive (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, helm) and the node's kubelet from the
# Go module proxy, because this machine has no Docker engine and may fetch no prebuilt
# binaries. The binaries are cached under a directory keyed by their versions, so a second
# run is a no-op; kubelet and kube-scheduler come from the same Kubernetes module (and so
# the same version key) as the apiserver, which also lets Go reuse most compiled packages.
# Prints the bin directory on its last line.
set -euo pipefail

K8S_VERSION=1.37.2
ETCD_VERSION=3.7.3
HELM_VERSION=4.3.1

here=$(cd "$(dirname "$0")/.." && pwd)
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/celery-reconciler
bin_dir=$cache_root/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION/bin
wanted=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl helm)

log() { echo "build-controlplane: $*" >&2; }

# Two concurrent `make` runs must not build into the same files: the second waits.
mkdir -p "$cache_root"
exec 9>"$cache_root/.build.lock"
flock 9

missing=()
for name in "${wanted[@]}"; do
  [ -x "$bin_dir/$name" ] || missing+=("$name")
done
if [ ${#missing[@]} -eq 0 ]; then
  log "cache hit: $bin_dir"
  echo "$bin_dir"
  exit 0
fi

command -v go >/dev/null || { log "Go is required to build the control plane (go not on PATH)"; exit 1; }
mkdir -p "$bin_dir"
export GOFLAGS=-mod=mod CGO_ENABLED=0
build_flags=(-trimpath)
started=$(date +%s)

# Without these the binaries call themselves v0.0.0-master, and Helm refuses charts
# whose kubeVersion constraint the "server" cannot meet.
version_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  version_ldflags+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1"
  version_ldflags+=" -X $pkg.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)"
  version_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=2026-01-01T00:00:00Z"
done

for name in "${missing[@]}"; do
  t0=$(date +%s)
  case "$name" in
    etcd)
      (cd "$here/tests/controlplane/etcd" && go build "${build_flags[@]}" -ldflags="-s -w" -o "$bin_dir/etcd.tmp" .) ;;
    kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|kubectl)
      (cd "$here/tests/controlplane/kube" && go build "${build_flags[@]}" -ldflags="-s -w $version_ldflags" \
        -o "$bin_dir/$name.tmp" "k8s.io/kubernetes/cmd/$name") ;;
    helm)
      GOBIN="$bin_dir/.helm-build" go install "${build_flags[@]}" -ldflags="-s -w" "helm.sh/helm/v4/cmd/helm@v$HELM_VERSION"
      mv "$bin_dir/.helm-build/helm" "$bin_dir/helm.tmp" && rmdir "$bin_dir/.helm-build" ;;
  esac
  # Rename last so an interrupted build never leaves a half-written binary in the cache.
  mv "$bin_dir/$name.tmp" "$bin_dir/$name"
  log "built $name in $(( $(date +%s) - t0 ))s"
done

log "built ${missing[*]} in $(( $(date +%s) - started ))s into $bin_dir"
echo "$bin_dir"
