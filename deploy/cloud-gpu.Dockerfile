# Cloud, GPU variant: the gkt service in front of `vllm serve` (its own container, see docker-compose.yml,
# profile gpu). This image talks to vLLM over its OpenAI API, so it needs no llama.cpp and no CUDA.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 GKT_CLOUD_HOST=0.0.0.0 GKT_CLOUD_PORT=8001 GKT_CLOUD_BACKEND=openai
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY cloud_service cloud_service
COPY edge_agent edge_agent
COPY gkt gkt
# Every runtime dependency except llama-cpp-python (imported lazily, only by the llama.cpp backend).
RUN python - <<'PY' > /tmp/req.txt
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.startswith("llama-cpp-python")))
PY
RUN pip install -r /tmp/req.txt && pip install --no-deps . && useradd --create-home gkt
USER gkt
EXPOSE 8001
CMD ["python", "-m", "cloud_service"]
