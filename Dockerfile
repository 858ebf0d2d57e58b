# syntax=docker/dockerfile:1
# The Kling MCP Gateway image: `docker build -t kling-mcp-gateway .` (deploy/README.md is the runbook).
# Both stages start from the same image, so the virtualenv built in the first runs unchanged in the second.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies get their own layer, read from pyproject.toml alone: editing app/ does not reinstall them.
COPY pyproject.toml ./
# The `otel` extra too: tracing stays off until OTEL_EXPORTER_OTLP_ENDPOINT is set (README, Observability).
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['otel']))" > /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip pip install -r /tmp/requirements.txt
# The package itself (setuptools reads README.md for the metadata), without touching the dependencies.
COPY README.md ./
COPY app ./app
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps .

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="kling-mcp-gateway" \
      org.opencontainers.image.description="Hosted, multi-tenant MCP and REST gateway for Kling AI image generation" \
      org.opencontainers.image.licenses="MIT"
# A numeric user, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 kgw \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kgw
COPY --from=build /opt/venv /opt/venv
# Bytecode was compiled at install time; at run time the root filesystem may be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000
# The slim image has no curl: the check is Python's urllib, which fails on anything but a 2xx.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# On SIGTERM `serve` drains: /readyz turns 503, waiting callers get their task at once, and uvicorn waits up to
# KGW_MAX_WAIT_SECONDS + 5 s for open requests. Give the container at least that long to stop
# (compose: stop_grace_period; Kubernetes: terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
CMD ["kling-gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
