# syntax=docker/dockerfile:1
#
# The auto-trace image: one program, every role (`auto-trace run --role ...`).
#
#   docker build -t auto-trace:0.1.0 .
#   docker run --rm auto-trace:0.1.0 topics create --dry-run
#
# Three stages: `native` compiles ingest's native fast path (native/, Rust) into an abi3 wheel;
# `build` installs the package, that wheel and the dependencies into a virtualenv; the final
# stage copies only that virtualenv and the Avro schemas onto a fresh base, runs as an
# unprivileged user and works with a read-only root filesystem. Every other dependency ships
# binary wheels for linux/amd64 and linux/arm64 (confluent-kafka bundles librdkafka), so only
# the `native` stage has a compiler.
#
# The bases are pinned by tag; pin them by digest too in your build system
# (--build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:..., likewise RUST_IMAGE).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG RUST_IMAGE=rust:1.95.0-slim-bookworm

FROM ${RUST_IMAGE} AS native
# The system's packages are the base image's business (tools/check_dockerfile.py --install
# does not run this line): a Python to run maturin, the wheel builder.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/maturin \
 && /opt/maturin/bin/python -m pip install --quiet "maturin>=1.9,<2"
WORKDIR /src/native
COPY native/Cargo.toml native/Cargo.lock native/pyproject.toml ./
COPY native/src/ src/
RUN /opt/maturin/bin/maturin build --release --locked --out /opt/wheels

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A venv without pip of its own: the build stage's pip installs into it, so the final image
# carries no installer in the application's environment.
RUN python -m venv --without-pip /opt/auto-trace/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumer/ consumer/
COPY --from=native /opt/wheels/ /opt/wheels/
# A regular (non-editable) install: wheels only for the dependencies, byte-compiled. The check
# at the end fails the build if the native fast path is missing from the image.
RUN python -m pip --python /opt/auto-trace/venv/bin/python install --only-binary=:all: \
        --no-binary=auto-trace . /opt/wheels/auto_trace_native-*.whl \
 && /opt/auto-trace/venv/bin/auto-trace --version \
 && /opt/auto-trace/venv/bin/python -c "import auto_trace_native"

FROM ${PYTHON_IMAGE}
ARG UID=10001
ARG GID=10001
# No installer in the runtime image either; one fixed, unprivileged user that the Helm chart's
# securityContext (runAsUser/runAsGroup 10001) matches.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid "${GID}" auto-trace \
 && useradd --system --uid "${UID}" --gid "${GID}" --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin auto-trace
COPY --from=build /opt/auto-trace/venv /opt/auto-trace/venv
# The package reads its Avro schemas from this directory (AUTO_TRACE_SCHEMAS_DIR).
COPY schemas/ /opt/auto-trace/schemas/
ENV PATH=/opt/auto-trace/venv/bin:$PATH \
    AUTO_TRACE_SCHEMAS_DIR=/opt/auto-trace/schemas \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER ${UID}:${GID}
# /metrics, /healthz, /readyz (metrics.port).
EXPOSE 9108
LABEL org.opencontainers.image.title="auto-trace" \
      org.opencontainers.image.description="Publishes closed trades to independent performance trackers after a fixed delay, with every personal field removed." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
ENTRYPOINT ["auto-trace"]
CMD ["--help"]
