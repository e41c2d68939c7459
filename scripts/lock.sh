#!/usr/bin/env bash
# Re-resolves the locks (requirements/*.txt, with hashes) from the pyproject files, then
# proves the new lock before it may be committed: the test bed is reinstalled from it and
# the tests of what broker.py copies from kombu and py-amqp (the byte-for-byte message
# tests, both brokers) and the RabbitMQ confirm tests must pass. On failure the old lock is
# put back. `make lock`; LOCK_UPGRADE=1 also moves pinned-by-range packages to their newest.
set -euo pipefail
cd "$(dirname "$0")/.."

uv=.venv/bin/uv
[ -x "$uv" ] || { echo "lock: run make setup first (uv comes with the dev extra)" >&2; exit 1; }
upgrade=()
[ "${LOCK_UPGRADE:-0}" = 1 ] && upgrade=(--upgrade)
backup=$(mktemp -d)
cp requirements/*.txt "$backup"/ 2>/dev/null || true
restore() { cp "$backup"/*.txt requirements/ 2>/dev/null || true; echo "lock: kept the old lock" >&2; }

for lock in test-bed image; do
  "$uv" pip compile "${upgrade[@]}" --quiet --universal --python-version 3.11 --generate-hashes \
    --no-emit-package celery-reconciler --no-emit-package celery-reconciler-worker \
    --custom-compile-command "make lock" \
    -o "requirements/$lock.txt" "requirements/$lock.in"
done

if ! bash scripts/setup.sh || ! .venv/bin/pytest -q -p no:cacheprovider \
    tests/unit/test_message_template.py tests/integration/test_broker_messages.py \
    tests/integration/test_amqp_confirms.py tests/unit/test_locked_versions.py; then
  restore
  exit 1
fi
echo "lock: requirements/test-bed.txt and requirements/image.txt re-resolved and proven"
