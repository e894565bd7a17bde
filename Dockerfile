# syntax=docker/dockerfile:1
# thrift-sidecar: a retrying, circuit-breaking proxy for Thrift services.
#
#   docker build -t thrift-sidecar .
#   docker run -e SIDECAR_UPSTREAM=10.0.0.5:9091 -p 9090:9090 -p 9464:9464 thrift-sidecar
#
# Stage 1 installs the runtime dependencies exactly as requirements.lock pins
# them (versions and sha256 hashes, binary wheels only) and the project's own
# wheel into a virtual environment at /opt/sidecar that has no pip. The wheel
# is the compiled build (THRIFT_SIDECAR_COMPILE=1: the per-call modules compiled
# with mypyc, docs/compiled.md), made in a second environment that has the
# same dependencies plus the tools requirements-build.lock pins; stage 2
# copies that environment onto the same base, removes pip from the base image,
# and runs as a non-root user. The default config is config/sidecar.yaml
# (every key with its default, plus the example Catalog service's idl and
# methods); mount your own at /etc/sidecar/sidecar.yaml, or set SIDECAR_*
# variables (SIDECAR_UPSTREAM=host:port, SIDECAR_RETRY__MAX_ATTEMPTS=4, ...).
# Ports: 9090 Thrift (listen), 9464 admin (/metrics /healthz /readyz /state).
#
# The base image is pinned to an exact Python release. To pin its content too,
# append the digest (deploy/README.md, "The image"):
#   FROM python:3.11.17-slim-bookworm@sha256:<digest>
# requirements.lock: regenerate it after changing pyproject.toml's dependencies
# with the command written at its top.

FROM python:3.11.17-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    THRIFT_SIDECAR_COMPILE=1
WORKDIR /src
# A C compiler for mypyc's output; this stage only.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# The dependencies first (their layer is reused until the locks change). The
# base image's pip installs into a venv created without one; the build venv
# has them too, since mypyc type-checks the code it compiles against them.
COPY requirements.lock requirements-build.lock ./
RUN python -m venv --without-pip /opt/sidecar \
 && pip --python /opt/sidecar/bin/python install --no-deps --require-hashes --only-binary=:all: \
      -r requirements.lock \
 && python -m venv --without-pip /opt/build \
 && pip --python /opt/build/bin/python install --no-deps --require-hashes --only-binary=:all: \
      -r requirements.lock -r requirements-build.lock
# What the wheel is built from. sidecar/testing/example.thrift and
# sidecar/demo/demo.yaml are symlinks into idl/ and config/, so those come along.
COPY pyproject.toml setup.py README.md ./
COPY idl ./idl
COPY config ./config
COPY sidecar ./sidecar
# The project itself, compiled, without its dependencies (the lock installed them).
RUN pip --python /opt/build/bin/python wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && pip --python /opt/sidecar/bin/python install --no-deps --no-index /wheels/thrift_sidecar-*.whl

FROM python:3.11.17-slim-bookworm
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="thrift-sidecar" \
      org.opencontainers.image.description="A retrying, circuit-breaking Thrift proxy that runs next to a Thrift service" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.17-slim-bookworm" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/sidecar/bin:$PATH \
    HEALTHCHECK_URL=http://127.0.0.1:9464/healthz
# Nothing installs packages at run time: pip (and setuptools and wheel, where
# the base has them) leave the image, with ensurepip's copies of them.
RUN /usr/local/bin/python -m pip uninstall --yes pip setuptools wheel \
 && rm -rf /usr/local/lib/python3.11/ensurepip \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
COPY --from=build /opt/sidecar /opt/sidecar
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
