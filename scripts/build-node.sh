#!/usr/bin/env bash
# Builds what a test-bed node needs besides the kubelet (which build-controlplane.sh makes
# from the Kubernetes module): containerd with its runc shim and ctr, from the Go module
# proxy, and the pause image, compiled from the Kubernetes module's own pause.c. Debian's
# containerd is 1.6, which lacks the CRI RuntimeConfig call that kubelet 1.38 requires, so
# we build a 2.x; runc comes from Debian (setup.sh), because crun cannot run on this
# machine kind's hybrid cgroup hierarchy. Cached under a directory keyed by the versions,
# so a second run is a no-op. Prints the directory on its last line: bin/ and images/.
set -euo pipefail

CONTAINERD_VERSION=2.4.2
K8S_VERSION=1.37.2
PAUSE_TAG=3.10-local

here=$(cd "$(dirname "$0")/.." && pwd)
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/celery-reconciler
node_dir=$cache_root/node-containerd-$CONTAINERD_VERSION-k8s-$K8S_VERSION
bin_dir=$node_dir/bin
pause_archive=$node_dir/images/pause-$PAUSE_TAG.tar

log() { echo "build-node: $*" >&2; }

mkdir -p "$cache_root"
exec 9>"$cache_root/.build-node.lock"
flock 9

if [ -x "$bin_dir/containerd" ] && [ -x "$bin_dir/containerd-shim-runc-v2" ] \
  && [ -x "$bin_dir/ctr" ] && [ -f "$pause_archive" ]; then
  log "cache hit: $node_dir"
  echo "$node_dir"
  exit 0
fi

command -v go >/dev/null || { log "Go is required to build containerd (go not on PATH)"; exit 1; }
command -v buildah >/dev/null || { log "buildah is missing: run scripts/setup.sh"; exit 1; }
mkdir -p "$bin_dir" "$node_dir/images"
export GOFLAGS=-mod=mod CGO_ENABLED=0

if ! [ -x "$bin_dir/containerd" ] || ! [ -x "$bin_dir/containerd-shim-runc-v2" ] || ! [ -x "$bin_dir/ctr" ]; then
  t0=$(date +%s)
  rm -rf "$bin_dir/.build" && mkdir -p "$bin_dir/.build"
  # The snapshotters we never use need cgo headers this machine may lack; overlayfs is built in.
  GOBIN="$bin_dir/.build" go install -trimpath -tags "no_btrfs no_devmapper no_zfs no_aufs" \
    -ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=v$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd@v$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@v$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/ctr@v$CONTAINERD_VERSION"
  # Move last so an interrupted build never leaves a half-written binary in the cache.
  mv "$bin_dir"/.build/* "$bin_dir/" && rmdir "$bin_dir/.build"
  log "built containerd, containerd-shim-runc-v2 and ctr v$CONTAINERD_VERSION in $(( $(date +%s) - t0 ))s"
fi

if ! [ -f "$pause_archive" ]; then
  t0=$(date +%s)
  # The pause source ships in the Kubernetes module that build-controlplane.sh downloads.
  k8s_src=$(cd "$here/tests/controlplane/kube" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" \
    | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  gcc -Os -static -DVERSION="$PAUSE_TAG" -o "$work/pause" "$k8s_src/build/pause/linux/pause.c"
  strip "$work/pause"
  storage=(--root "$work/storage" --runroot "$work/runroot" --storage-driver vfs)
  c=$(buildah "${storage[@]}" from scratch)
  buildah "${storage[@]}" copy "$c" "$work/pause" /pause >/dev/null
  buildah "${storage[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$c"
  buildah "${storage[@]}" commit -q "$c" "localhost/pause:$PAUSE_TAG" >/dev/null
  # The archive names the image as the kubelet's default sandbox image, so nothing is pulled.
  buildah "${storage[@]}" push -q "localhost/pause:$PAUSE_TAG" \
    "oci-archive:$pause_archive.tmp:registry.k8s.io/pause:3.10"
  buildah "${storage[@]}" rm -a >/dev/null
  buildah "${storage[@]}" rmi -a -f >/dev/null
  mv "$pause_archive.tmp" "$pause_archive"
  log "built the pause image in $(( $(date +%s) - t0 ))s"
fi

echo "$node_dir"
