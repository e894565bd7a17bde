# syntax=docker/dockerfile:1
# thrift-sidecar: a retrying, circuit-breaking proxy for Thrift services.
#
#   docker build -t thrift-sidecar .
#   docker run -e SIDECAR_UPSTREAM=10.0.0.5:9091 -p 9090:9090 -p 9464:9464 thrift-sidecar
#
# Stage 1 builds the project's wheel and the wheels of its dependencies;
# stage 2 installs them (no compiler, no build tools, no pip cache) and runs
# as a non-root user. The default config is config/sidecar.yaml (every key
# with its default, plus the example Catalog service's idl and methods);
# mount your own at /etc/sidecar/sidecar.yaml, or set SIDECAR_* variables
# (SIDECAR_UPSTREAM=host:port, SIDECAR_RETRY__MAX_ATTEMPTS=4, ...).
# Ports: 9090 Thrift (listen), 9464 admin (/metrics /healthz /readyz /state).

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# What the wheel is built from. sidecar/testing/example.thrift and
# sidecar/demo/demo.yaml are symlinks into idl/ and config/, so those come along.
COPY pyproject.toml README.md ./
COPY idl ./idl
COPY config ./config
COPY sidecar ./sidecar
# Every dependency has a binary wheel for linux/amd64 and linux/arm64; on a
# platform without one, add `apt-get install -y gcc` here.
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HEALTHCHECK_URL=http://127.0.0.1:9464/healthz
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels thrift-sidecar \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
# The default config, and the IDL it names (idl: ../idl/example.thrift).
COPY config/sidecar.yaml /etc/sidecar/sidecar.yaml
COPY idl/example.thrift /etc/idl/example.thrift
USER 10001:10001
EXPOSE 9090 9464
# HEALTHCHECK_URL: change it with metrics.listen. urlopen raises (exit 1) on
# anything but a 2xx answer.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=3)"]
# Exec form: the sidecar is PID 1 and gets SIGTERM itself (it drains, then exits 0).
ENTRYPOINT ["sidecar", "run", "--config", "/etc/sidecar/sidecar.yaml"]
