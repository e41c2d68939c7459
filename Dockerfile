# One image for the operator and the demo worker.
#   operator:     docker run IMAGE                      (celery-reconciler run --all-namespaces)
#   demo worker:  docker run --entrypoint celery IMAGE -A celery_app.demo worker -Q insights
# The chart (charts/celery-reconciler) runs both from it.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# Builder: compile any dependency that has no wheel for this platform, then install the
# project and its dependencies into a self-contained virtualenv.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libpq-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Every third-party package at the version, and with the hash, of the lock (make lock).
COPY requirements/image.txt requirements/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements/image.txt
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY celery_app/ celery_app/
# Two distributions of this repository: the operator's (.) requires the worker's (./celery_app),
# which no index serves, so both are built here and installed without resolving anything again.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels ./celery_app . \
 && /opt/venv/bin/pip install --no-index --no-deps /wheels/*.whl \
 && /opt/venv/bin/pip check

# Final: the same base without compilers or wheels, only the virtualenv, as a numeric
# non-root user (so runAsNonRoot can verify it without an /etc/passwd lookup).
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="celery-reconciler" \
      org.opencontainers.image.description="Kubernetes operator that guarantees every unprocessed PostgreSQL row is processed by a Celery task" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=builder /opt/venv /opt/venv
USER 65532:65532
WORKDIR /tmp
# 8080: kopf's liveness endpoint (--liveness); 9090: Prometheus metrics (--metrics-port).
EXPOSE 8080 9090
ENTRYPOINT ["celery-reconciler"]
CMD ["run", "--all-namespaces"]
