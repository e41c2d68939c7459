#!/usr/bin/env bash
# Makes this machine ready for `make test` and `make demo`: the Debian packages the
# test bed runs (PostgreSQL server, Redis, RabbitMQ, openssl; runc for the node, buildah and
# debootstrap for the image; stress-ng for `make flake`), the project's .venv, the
# control-plane and node binaries,
# and the project's image. Every step checks first, so a ready machine takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "setup: $*" >&2; }

need_packages=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_packages+=(postgresql)
command -v redis-server >/dev/null || need_packages+=(redis-server)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_packages+=(rabbitmq-server)
command -v openssl >/dev/null || need_packages+=(openssl)
command -v git >/dev/null || need_packages+=(git)
[ -x /usr/sbin/runc ] || need_packages+=(runc)
command -v buildah >/dev/null || need_packages+=(buildah)
command -v debootstrap >/dev/null || need_packages+=(debootstrap)
command -v gcc >/dev/null || need_packages+=(gcc libc6-dev)   # the static pause binary
command -v stress-ng >/dev/null || need_packages+=(stress-ng)  # `make flake`'s CPU load
if [ ${#need_packages[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_packages[*]}"
  [ "$(id -u)" = 0 ] || { log "need root (or sudo) to install ${need_packages[*]}"; exit 1; }
  # Packages must not start system-wide services: tests start their own throwaway servers.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_packages[@]}" >/dev/null
fi

python=${PYTHON:-python3}
# The venv is exactly the lock (requirements/test-bed.txt, with hashes, re-resolved only by
# `make lock`): when the lock or a pyproject changes, it is made anew rather than updated, so
# nothing installed earlier lingers beside the locked versions.
stamp=.venv/.installed-$(cat pyproject.toml celery_app/pyproject.toml requirements/test-bed.txt | sha256sum | cut -c1-16)
exec 8>.setup.lock
flock 8  # two concurrent `make` runs must not install into one venv at once
if [ ! -f "$stamp" ]; then
  log "creating .venv from requirements/test-bed.txt, then the project's two distributions"
  "$python" -m venv --clear .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q --require-hashes --no-deps -r requirements/test-bed.txt
  # Both distributions of this repository, editable and without resolving anything again:
  # the operator's requires the worker's (celery_app/pyproject.toml), which no index serves.
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e ./celery_app -e .
  .venv/bin/python -m pip check
  touch "$stamp"
fi

bash scripts/build-controlplane.sh >/dev/null
bash scripts/build-node.sh >/dev/null
bash scripts/build-image.sh >/dev/null
log "ready"
