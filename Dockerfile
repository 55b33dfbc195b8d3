# nmi container image: a venv with nmi and its dependencies, on Debian's iptables.
#
#   docker build -t nmi:0.1.0 .
#
# Base images are pinned by full version tag (Python patch release + Debian release).
# Pin them by digest as well in your build (python:3.11.11-slim-bookworm@sha256:...): the
# digest could not be looked up where this file was written, so none is given here.

# --- build: wheels of nmi and every dependency, installed into /opt/venv -----------------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY . .
# All dependencies ship binary wheels for Linux x86_64/arm64 on CPython 3.11, so no
# compiler is needed (none is installed). The venv gets no pip of its own: the build
# stage's pip installs into it, and compiles the bytecode there (the root filesystem is
# read-only at run time).
RUN pip wheel --no-cache-dir . -w /wheels \
 && python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir --no-index \
        --find-links=/wheels nmi \
 && /opt/venv/bin/nmi --version

# --- runtime ----------------------------------------------------------------------------
FROM python:3.11.11-slim-bookworm AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="nmi" \
      org.opencontainers.image.description="Node Managed Identity: answers pods' IMDS token requests with the Azure identity they are bound to (aad-pod-identity compatible)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.11-slim-bookworm"
# Debian's iptables package brings both iptables-nft and iptables-legacy (nmi uses the one
# the node's other rules use); conntrack for --enable-conntrack-deletion.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables conntrack \
 && rm -rf /var/lib/apt/lists/*
# Only the venv: no wheels, no sources, no build cache.
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Root, on purpose: nmi installs iptables rules and deletes conntrack entries, which needs
# NET_ADMIN (and NET_RAW) in the node's network namespace and the xtables lock. The
# DaemonSet runs it as uid 0 with every other capability dropped, no privilege escalation
# and a read-only root filesystem.
USER 0
ENTRYPOINT ["/opt/venv/bin/nmi"]
