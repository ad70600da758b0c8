# Edge: the student on llama.cpp. Builds for linux/amd64 and linux/arm64 alike
# (docker buildx build --platform linux/amd64,linux/arm64 -f deploy/edge.Dockerfile .): llama.cpp is compiled
# without -march=native, so the image runs on any CPU of the target architecture.
FROM python:3.11-slim
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF"
ENV CMAKE_ARGS=${CMAKE_ARGS} PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 GKT_MODEL_DIR=/models \
    GKT_EDGE_HOST=0.0.0.0 GKT_EDGE_PORT=8002
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake curl \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY cloud_service cloud_service
COPY edge_agent edge_agent
COPY gkt gkt
RUN pip install . && useradd --create-home gkt && mkdir -p /models /var/lib/gkt/telemetry \
 && chown gkt /models /var/lib/gkt/telemetry
COPY deploy/entrypoint.sh /entrypoint.sh
USER gkt
EXPOSE 8002
ENTRYPOINT ["/entrypoint.sh"]
CMD ["edge"]
