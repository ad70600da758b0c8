# Cloud, CPU variant: the llama.cpp teacher in process. Portable build (no -march=native).
FROM python:3.11-slim
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF"
ENV CMAKE_ARGS=${CMAKE_ARGS} PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 GKT_MODEL_DIR=/models \
    GKT_CLOUD_HOST=0.0.0.0 GKT_CLOUD_PORT=8001
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake curl \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY cloud_service cloud_service
COPY edge_agent edge_agent
COPY gkt gkt
RUN pip install . && useradd --create-home gkt && mkdir -p /models && chown gkt /models
COPY deploy/entrypoint.sh /entrypoint.sh
USER gkt
EXPOSE 8001
ENTRYPOINT ["/entrypoint.sh"]
CMD ["cloud"]
