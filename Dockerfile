# ingate image: the endpoint picker for Kubernetes (docs/kubernetes.md) and every other `ingate`
# command. Build: docker build -t ingate:0.1.0 .   (or: make image; buildah works too)
# Stage 1 builds wheels for ingate and all its dependencies; stage 2 installs them into a slim
# Python without compilers, pip caches or the source tree, and runs as a non-root user.
ARG PYTHON_VERSION=3.11
# Air-gapped clusters: point this at a mirror of the same image (--build-arg BASE_IMAGE=...).
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

FROM ${BASE_IMAGE} AS builder
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${BASE_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1
# The same uid/gid the Helm chart's securityContext runs as (runAsUser 10001).
RUN groupadd --system --gid 10001 ingate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin ingate
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels /wheels/ingate-*.whl
USER 10001:10001
# 9002 ext_proc (gRPC), 9003 gRPC health, 9090 Prometheus metrics: the upstream picker's ports.
EXPOSE 9002 9003 9090
ENTRYPOINT ["ingate"]
CMD ["--help"]
