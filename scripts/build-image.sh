#!/usr/bin/env bash
# Builds the project's image from its unchanged Dockerfile without a Docker engine, so the
# test bed's node runs exactly what a user deploys. buildah (vfs storage, chroot isolation,
# never pulling) builds it on a base image made here with debootstrap, because this
# machine may reach Debian's mirror and PyPI but no container registry: the Dockerfile's
# PYTHON_IMAGE build argument names that local base instead of the official python image
# (Debian's python 3.11, close to but not byte-identical with the official 3.11.14).
#
# Both are cached: the base by its recipe (and the host's extra CA certificates, which it
# carries because this machine's egress re-signs TLS and pip inside RUN must trust that —
# only the base, never our Dockerfile), the image by a hash of the Dockerfile, the files
# its build context admits and the base. Prints the image reference, then the OCI archive
# to import into containerd, on its last two lines.
set -euo pipefail

SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates

here=$(cd "$(dirname "$0")/.." && pwd)
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/celery-reconciler
images=$cache_root/images
storage=(--root "$cache_root/buildah/root" --runroot "$cache_root/buildah/runroot" --storage-driver vfs)

log() { echo "build-image: $*" >&2; }


extra_cas=(/usr/local/share/ca-certificates/*.crt)
[ -e "${extra_cas[0]}" ] || extra_cas=()
base_key=$( { echo "$SUITE $BASE_PACKAGES v1"; cat ${extra_cas[@]+"${extra_cas[@]}"}; } | sha256sum | cut -c1-16)
base_ref=localhost/celery-reconciler-base:$SUITE-$base_key

# The inputs the build can see: the Dockerfile and what .dockerignore admits to the context.
image_key=$(cd "$here" && {
  echo "$base_ref"
  cat Dockerfile .dockerignore
  find requirements/image.txt pyproject.toml README.md operator celery_app -type f \
    -not -path '*/__pycache__/*' -not -name '*.pyc' -not -path '*.egg-info/*' -not -path '*/build/*' -print0 | sort -z | xargs -0 sha256sum
} | sha256sum | cut -c1-16)
image_ref=localhost/celery-reconciler:$image_key
archive=$images/celery-reconciler-$image_key.tar

# An image already built is read without the lock: many checkouts share this cache, and one
# building another image (minutes) must not hold up those whose image is ready.
if [ -f "$archive" ]; then
  echo "$image_ref"
  echo "$archive"
  exit 0
fi

mkdir -p "$images"
exec 9>"$cache_root/.build-image.lock"
flock 9
command -v buildah >/dev/null || { log "buildah is missing: run scripts/setup.sh"; exit 1; }

if ! buildah "${storage[@]}" inspect --type image "$base_ref" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { log "debootstrap is missing: run scripts/setup.sh"; exit 1; }
  t0=$(date +%s)
  mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)}
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d "$cache_root/base-rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  log "debootstrap $SUITE (minbase + $BASE_PACKAGES) from $mirror"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log" "$rootfs"/var/cache/apt/archives/*.deb
  rm -rf "$rootfs"/var/lib/apt/lists/*
  if [ ${#extra_cas[@]} -gt 0 ]; then
    cp "${extra_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  c=$(buildah "${storage[@]}" from scratch)
  m=$(buildah "${storage[@]}" mount "$c")
  cp -a "$rootfs/." "$m/"
  buildah "${storage[@]}" umount "$c" >/dev/null
  buildah "${storage[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3"]' "$c"
  buildah "${storage[@]}" commit -q "$c" "$base_ref" >/dev/null
  buildah "${storage[@]}" rm "$c" >/dev/null
  log "built the base image $base_ref in $(( $(date +%s) - t0 ))s"
fi


if ! [ -f "$archive" ]; then
  t0=$(date +%s)
  log "building $image_ref from Dockerfile"
  buildah "${storage[@]}" bud --isolation chroot --pull-never --layers=false -q \
    --build-arg "PYTHON_IMAGE=$base_ref" -t "$image_ref" -f "$here/Dockerfile" "$here" >/dev/null
  t1=$(date +%s)
  buildah "${storage[@]}" push -q "$image_ref" "oci-archive:$archive.tmp:$image_ref"
  buildah "${storage[@]}" rmi -f "$image_ref" >/dev/null
  mv "$archive.tmp" "$archive"
  # Each edit of the sources makes a new image; keep the eight newest archives (several
  # checkouts of different commits may be testing at once).
  ls -t "$images"/celery-reconciler-*.tar | tail -n +9 | xargs -r rm -f
  log "built $image_ref in $(( t1 - t0 ))s, archived in $(( $(date +%s) - t1 ))s"
fi

echo "$image_ref"
echo "$archive"
