# syntax=docker/dockerfile:1
# usermgr's HTTP API on PostgreSQL (or SQLite): see compose.yaml and the README's "Deploy".
#
# Two stages: `build` makes the wheels of usermgr and of everything its api and postgres
# extras need; the final image installs them from that directory alone (no index, no
# compiler, no source tree) and runs as an unprivileged user. No key or secret is baked in:
# the container gets its signing key from a mounted file (USERMGR_KEY_FILE, a compose
# secret) or from USERMGR_SECRET_KEY, and `usermgr serve` exits 2 with one line without one.
#
# tests/test_release.py runs this file's RUN steps (with $WHEELS pointing elsewhere), its
# USER, its CMD and its HEALTHCHECK outside Docker, in a fresh virtual environment: keep
# them plain shell and JSON-form commands.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV WHEELS=/wheels \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN python -m pip wheel --no-cache-dir --wheel-dir "$WHEELS" ".[api,postgres]"

FROM ${PYTHON_IMAGE}
ENV WHEELS=/wheels \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# DL3013 (pin versions in pip install): the only index here is the build stage's wheel
# directory (--no-index), so the versions are exactly the ones that stage resolved.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links "$WHEELS" "usermgr[api,postgres]"
# The unprivileged user, and its home for a SQLite database and its key file when no
# USERMGR_DATABASE_URL is given (mount a volume there to keep them).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/usermgr --shell /usr/sbin/nologin usermgr \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/usermgr
USER 10001:10001
WORKDIR /var/lib/usermgr
EXPOSE 8000
# The slim image has no curl: the standard library asks /healthz, which answers 200 only
# when the database does.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=8)"]
CMD ["usermgr", "serve", "--host", "0.0.0.0"]
