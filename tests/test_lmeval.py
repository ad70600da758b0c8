"""lm-evaluation-harness, unchanged, against the real edge (a peer client; issue 21 point 4).

lm-eval runs from its own virtualenv (``make lmeval-setup``: torch and lm-eval never enter ``.venv``), fully
offline (``HF_DATASETS_OFFLINE``, ``HF_HUB_OFFLINE``): a custom task over a JSONL this test writes from a few
examples in the format of ``../shared/data`` (GSM8K: ``question``, ``answer`` ending in ``#### N``;
CommonsenseQA: ``question.stem``, ``question.choices``, ``answerKey``), so nothing comes from a hub.

Generation runs through ``local-completions`` (gkt and student modes: the mode travels in ``--gen_kwargs``,
which lm-eval merges into each request) and ``local-chat-completions``. The multiple-choice task runs through
``local-completions`` with ``echo`` and ``logprobs`` (prompt log-probabilities) and the edge's own tokenizer
(``/tokenizer_info``, ``/tokenize``, ``/detokenize``); its log-likelihoods are checked against the student's
own, computed here with llama-cpp-python.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.models import resolve
from tests.conftest import CLIENT_KEY, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, running_pair

pytestmark = pytest.mark.models

LMEVAL = Path(__file__).resolve().parents[1] / ".venv-lmeval" / "bin" / "lm_eval"
ENV = {
    "GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "1024",
    "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "1024",
    **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS,
}
# In the format of ../shared/data/gsm8k (written for this test, not drawn from the data set).
GSM8K = [
    {"question": "Tom has 3 boxes with 4 pens in each box. How many pens does he have?",
     "answer": "Tom has 3 * 4 = <<3*4=12>>12 pens.\n#### 12"},
    {"question": "A shop sold 10 apples in the morning and 5 in the afternoon. How many apples did it sell?",
     "answer": "It sold 10 + 5 = <<10+5=15>>15 apples.\n#### 15"},
    {"question": "Ann had 20 dollars and spent 8. How many dollars does she have left?",
     "answer": "She has 20 - 8 = <<20-8=12>>12 dollars left.\n#### 12"},
]
# In the format of ../shared/data/csqa.
CSQA = [
    {"answerKey": "B", "id": "t1", "question": {"question_concept": "water", "stem": "Where do fish live?",
     "choices": [{"label": "A", "text": "desert"}, {"label": "B", "text": "river"}, {"label": "C", "text": "sky"}]}},
]
GENERATE_TASK = """task: gkt_gsm8k_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('#### ')[-1]}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  max_gen_toks: 24
  do_sample: false
  temperature: 0
filter_list:
  - name: number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
CHOICE_TASK = """task: gkt_csqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{['A', 'B', 'C', 'D', 'E'].index(answerKey)}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not LMEVAL.exists():
        pytest.skip("lm-evaluation-harness is not set up: run `make lmeval-setup` (make test does)")
    with running_pair(tmp_path_factory.mktemp("lmeval-logs"), ENV) as (_, edge):
        yield edge.url


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lmeval-tasks")
    for name, rows, task in (("gsm8k", GSM8K, GENERATE_TASK), ("csqa", CSQA, CHOICE_TASK)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(task.format(data=data))
    return root


def model_args(base_url: str, tokenizer: str = "tokenizer_backend=None,tokenized_requests=False") -> str:
    """lm-eval's ``--model_args`` for the edge (no tokenizer: generation needs none, and none is downloaded)."""
    return f"model=gkt,base_url={base_url},{tokenizer},num_concurrent=1,max_retries=1"


def lm_eval(tasks: Path, out: Path, model: str, args: str, task: str, *extra: str) -> dict[str, Any]:
    """One lm-eval run; its results (the JSON it writes) and the logged samples."""
    argv = [str(LMEVAL), "--model", model, "--model_args", args, "--tasks", task,
            "--include_path", str(tasks), "--output_path", str(out), "--log_samples", *extra]
    env = {**os.environ, "OPENAI_API_KEY": CLIENT_KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for f in out.rglob(f"samples_{task}_*.jsonl") for line in f.read_text().splitlines()]
    return {"results": results["results"][task], "samples": samples}


@pytest.mark.parametrize(("model", "route", "extra"), [
    ("local-completions", "/v1/completions", []),  # gkt mode, the edge's default
    ("local-completions", "/v1/completions", ["--gen_kwargs", "mode=student"]),
    ("local-chat-completions", "/v1/chat/completions", ["--apply_chat_template"]),
])
def test_generation_task_runs_unchanged_against_the_edge(
    edge: str, tasks: Path, tmp_path: Path, model: str, route: str, extra: list[str]
) -> None:
    run = lm_eval(tasks, tmp_path, model, model_args(edge + route), "gkt_gsm8k_local", *extra)
    score = run["results"]["exact_match,number"]
    assert 0.0 <= score <= 1.0
    assert len(run["samples"]) == len(GSM8K)
    assert all(s["resps"] and s["resps"][0][0].strip() for s in run["samples"])  # every answer has text


def test_multiple_choice_task_runs_unchanged_against_the_edge(edge: str, tasks: Path, tmp_path: Path) -> None:
    # The remote tokenizer's own requests carry the key through lm-eval's auth_token.
    args = model_args(edge + "/v1/completions",
                      f"tokenizer_backend=remote,tokenized_requests=False,auth_token={CLIENT_KEY}")
    run = lm_eval(tasks, tmp_path, "local-completions", args, "gkt_csqa_local")
    assert 0.0 <= run["results"]["acc,none"] <= 1.0 and len(run["samples"]) == len(CSQA)
    # Each choice's log-likelihood is the student's own: llama-cpp-python over the same tokens.
    import llama_cpp
    import numpy as np

    ref = llama_cpp.Llama(model_path=str(resolve(ENV["GKT_EDGE_MODEL"])), n_ctx=1024, n_threads=1,
                          n_threads_batch=1, logits_all=True, verbose=False)
    try:
        for sample in run["samples"]:
            for args, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
                context, continuation = args["arg_0"], args["arg_1"]
                ctx = ref.tokenize(context.encode(), add_bos=False)
                cont = ref.tokenize(continuation.encode(), add_bos=False)
                ref.reset()
                ref.eval(ctx + cont)
                rows = llama_cpp.Llama.logits_to_logprobs(np.array(ref.scores[: len(ctx) + len(cont)]))
                expected = sum(float(rows[len(ctx) - 1 + i][t]) for i, t in enumerate(cont))
                assert float(resp[0][0]) == pytest.approx(expected, abs=1e-3 * len(cont))
    finally:
        ref.close()
