# syntax=docker/dockerfile:1
# The Vitrine retrieval service (gRPC :50051). Serving side only: `pip install .[serve]`, no torch/open_clip.
#
#   docker build -f docker/retrieval.Dockerfile -t vitrine-retrieval .     (context = repository root)
#
# Settings come from VITRINE_* environment variables (retrieval_service/settings.py, nested with `__`);
# the model repository (manifest.json + tokenizer.json) is mounted at /models, image bytes live in
# /var/lib/vitrine/blobs (a volume; shared storage when several replicas run, see docs/deployment.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- 1. generated gRPC stubs (vitrine.v1) from proto/, as `make proto` does -------------------------------
# grpcio-tools is pinned with the runtime set: its stubs refuse a grpcio older than the grpcio-tools that made them.
FROM ${PYTHON_IMAGE} AS stubs
COPY docker/constraints-serve.txt /tmp/constraints-serve.txt
RUN pip install --no-cache-dir -c /tmp/constraints-serve.txt grpcio-tools googleapis-common-protos
WORKDIR /src
COPY proto/ proto/
# google/rpc/status.proto comes from googleapis-common-protos (site-packages); well-known types from grpc_tools.
RUN mkdir -p vitrine/v1 \
 && python -m grpc_tools.protoc -Iproto \
      -I"$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
      --python_out=. --grpc_python_out=. proto/vitrine/v1/*.proto \
 && touch vitrine/v1/__init__.py

# --- 2. the package and its serving dependencies in a venv --------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vitrine/ vitrine/
COPY export/ export/
COPY encoder_server/ encoder_server/
COPY retrieval_service/ retrieval_service/
COPY tools/ tools/
COPY --from=stubs /src/vitrine/v1/ vitrine/v1/
# Pinned (docker/serve_constraints.py writes the file from the project venv): a fresh resolution backtracks for
# minutes and may pick versions the tests never ran.
COPY docker/constraints-serve.txt /tmp/constraints-serve.txt
RUN /opt/venv/bin/pip install -c /tmp/constraints-serve.txt ".[serve]"
# The serving image must not contain torch, torchvision or open_clip (the [export] extra brings them). Run from /
# so the installed package is imported, not the sources in /src.
WORKDIR /
RUN /opt/venv/bin/python -c "import importlib.util as u, sys; \
bad = [m for m in ('torch', 'torchvision', 'open_clip') if u.find_spec(m)]; \
sys.exit(f'serving image contains {bad}' if bad else 0)" \
 && /opt/venv/bin/python -c "import retrieval_service.grpc.server, tools.cli"

# --- 3. runtime --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    VITRINE_HOST=0.0.0.0 VITRINE_PORT=50051 \
    VITRINE_MODEL_REPOSITORY=/models VITRINE_BLOB_DIR=/var/lib/vitrine/blobs
COPY --from=build /opt/venv /opt/venv
COPY docker/grpc_health_check.py /usr/local/bin/vitrine-healthcheck
RUN chmod 0755 /usr/local/bin/vitrine-healthcheck \
 && useradd --system --uid 10001 --home-dir /var/lib/vitrine --create-home vitrine \
 && mkdir -p /var/lib/vitrine/blobs && chown -R vitrine:vitrine /var/lib/vitrine
USER vitrine
WORKDIR /var/lib/vitrine
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["vitrine-healthcheck", "--target", "127.0.0.1:50051", "--service", "vitrine.v1.RetrievalService"]
# `vitrine serve` handles SIGTERM: it stops accepting calls, drains in-flight ones, then exits.
ENTRYPOINT ["vitrine", "serve"]
