"""``gkt distill`` on real parts at CI size: a transfer set through the live cloud (the Qwen teacher, billed to
the edge's key), LoRA training in .venv-distill (a killed run resumes to the same adapter), GGUF export, and
llama.cpp loading the adapter and computing other log-probabilities than the base model."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from gkt import cli
from gkt.distill import transfer
from gkt.distill.cli import DISTILL_VENV
from gkt.launcher import Service
from shared.models import DEFAULT_STUDENT, resolve
from shared.splits import split_of
from shared.tasks import TASKS
from tests.conftest import AUTH, EDGE_KEY

pytestmark = pytest.mark.models

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
ROOT = Path(__file__).resolve().parents[1]
SMOL = "smollm2-135m-instruct"


def collect(cloud: Service, out: Path, n: int) -> bool:
    """Runs ``gkt distill collect``; True when it sent a request again (then a timed-out try may be billed)."""
    argv = ["distill", "collect", "--task", "gsm8k", "--data", str(DATA), "--cloud-url", cloud.url, "--api-key",
            EDGE_KEY, "--strategies", "base,ground_truth", "-n", str(n), "--out", str(out), "--workers", "4",
            "--top-logprobs", "4", "--max-tokens", "200"]
    err = io.StringIO()
    with pytest.raises(SystemExit) as done, contextlib.redirect_stderr(err):
        cli.main(argv)
    assert done.value.code == 0, err.getvalue()
    return "sent again" in err.getvalue()


def billed(cloud: Service) -> int:
    return httpx.get(cloud.url + "/v1/usage", headers=AUTH, timeout=30).json()["completion_tokens"]


@pytest.fixture(scope="module")
def transfer_set(cloud: Service, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two train questions under base and ground_truth, then a third after a torn write (resume)."""
    out = tmp_path_factory.mktemp("distill") / "gsm8k.jsonl"
    before = billed(cloud)
    retried = collect(cloud, out, 2)
    first = out.read_text()
    assert len(first.splitlines()) == 4
    with open(out, "a") as fh:
        fh.write('{"v": 1, "task": "gsm8k", "id": "torn')  # a kill in the middle of a write
    retried |= collect(cloud, out, 3)
    text = out.read_text()
    assert text.startswith(first) and len(text.splitlines()) == 6  # only the new question was asked
    lessons = transfer.read(out)
    # Every answer went through the ledger under the edge's key, each exactly once (a retried answer is billed
    # once under its Idempotency-Key, but a try that timed out mid-answer was work done: then at least once).
    kept = sum(x.raw["usage"]["completion_tokens"] for x in lessons)
    assert billed(cloud) - before >= kept if retried else billed(cloud) - before == kept
    return out


def test_collect_keeps_the_teacher_s_answers_with_top_k_where_the_tokenizer_matches(transfer_set: Path) -> None:
    lessons = transfer.read(transfer_set)
    assert {x.strategy for x in lessons} == {"base", "ground_truth"}
    assert all(split_of("gsm8k", x.id) == "train" for x in lessons)
    for x in lessons:
        assert x.prompt.endswith("\nA:") and "reference solution" not in x.prompt  # the unprimed prompt
        # Kept only when the answer line states the gold answer (the extractor's fallback guess does not count).
        assert x.correct == (TASKS["gsm8k"].stated_answer(x.answer) == x.gold)
        assert not x.correct or x.extracted == x.gold
    # The student (Qwen 0.5B) shares the teacher's tokenizer: its ids for the answer are the teacher's.
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(resolve(DEFAULT_STUDENT)), vocab_only=True, verbose=False)
    matched = [x for x in lessons if x.logprobs is not None]
    assert matched, [x.raw["tokenizer"] for x in lessons]
    for x in matched:
        assert vocab.detokenize(x.logprobs.ids).decode() == x.answer
        assert all(len(top) == 4 and top[0][1] >= top[-1][1] for top in x.logprobs.top)
    vocab.close()
    assert any(x.correct for x in lessons if x.strategy == "ground_truth")


def distill_train(*args: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [str(DISTILL_VENV / "bin" / "python"), "-m", "gkt.distill.train", "--task", "gsm8k", "--out", str(out),
            "--batch-size", "1", "--grad-accum", "1", "--warmup", "1", "--lr", "1e-3", "--threads", "1", *args]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, output
    return output


def next_token_logprobs(lora: Path | None, model: str, prompt: str) -> np.ndarray:
    import llama_cpp

    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    llm = llama_cpp.Llama(model_path=str(resolve(model)), n_ctx=512, n_threads=1, logits_all=True, verbose=False,
                          **kwargs)
    try:
        llm.eval(llm.tokenize(prompt.encode(), add_bos=True, special=False))
        scores = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    finally:
        llm.close()
    return scores - scores.max() - np.log(np.exp(scores - scores.max()).sum())


def test_distill_the_qwen_student_with_kl_export_and_load_in_llama_cpp(transfer_set: Path, tmp_path: Path) -> None:
    run = tmp_path / "qwen"
    out = finish(distill_train("--transfer", str(transfer_set), "--student", DEFAULT_STUDENT, "--max-steps", "1",
                               "--top-k", "4", "--max-len", "400", out=run))
    step = json.loads((run / "progress.jsonl").read_text().splitlines()[-1])
    assert step["kl"] is not None and step["kl"] >= 0 and step["ce"] > 0, out  # the teacher's top-k were used
    gguf = run / "qwen.gguf"
    manifest = json.loads((run / "qwen.gguf.json").read_text())
    assert manifest["size"] == gguf.stat().st_size and manifest["base_model"]["name"] == DEFAULT_STUDENT
    import hashlib

    assert manifest["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert "lm_head" not in manifest["lora"]["target_modules"] and len(manifest["lora"]["target_modules"]) == 7
    prompt = transfer.read(transfer_set)[0].prompt
    base, tuned = next_token_logprobs(None, DEFAULT_STUDENT, prompt), next_token_logprobs(gguf, DEFAULT_STUDENT, prompt)
    assert np.abs(base - tuned).max() > 1e-3  # the adapter is applied


def test_a_killed_training_resumes_to_the_same_adapter(tmp_path: Path) -> None:
    """Plain fine-tuning of SmolLM2 on gold solutions (the --source gold baseline), killed with SIGKILL."""
    common = ("--source", "gold", "--data", str(DATA), "-n", "6", "--student", SMOL, "--max-steps", "3",
              "--checkpoint-every", "1", "--no-export", "--max-len", "200")
    finish(distill_train(*common, out=tmp_path / "whole"))
    steps = [json.loads(line) for line in (tmp_path / "whole" / "progress.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3] and all(s["kl"] is None and s["ce"] > 0 for s in steps)
    proc = distill_train(*common, out=tmp_path / "killed")
    progress = tmp_path / "killed" / "progress.jsonl"
    deadline = time.monotonic() + 1200
    while not (progress.exists() and len(progress.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # right after step 2: its checkpoint may be half written
    proc.wait()
    resumed = finish(distill_train(*common, out=tmp_path / "killed"))
    assert "resuming from step" in resumed
    a, b = (tmp_path / d / "adapter" / "adapter_model.safetensors" for d in ("whole", "killed"))
    assert a.read_bytes() == b.read_bytes()  # nothing lost, nothing done twice


def test_a_bad_transfer_set_is_refused_naming_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"v": 1}\n')
    proc = distill_train("--transfer", str(bad), "--student", SMOL, out=tmp_path / "run")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1 and f"{bad}:1: missing field" in output
