"""``gkt distill``: collect a transfer set through a live cloud, then train and export a LoRA adapter.

    gkt distill collect --task gsm8k --data train.jsonl --cloud-url http://127.0.0.1:8001 \\
        --strategies base,ground_truth -n 1000 --out distill/gsm8k.jsonl
    gkt distill train --task gsm8k --transfer distill/gsm8k.jsonl --strategy ground_truth --out distill/gt
    gkt distill train --task gsm8k --data train.jsonl --source gold --out distill/gold

``collect`` runs here; ``train`` and ``export`` run in ``.venv-distill`` (torch, transformers, peft: ``make
distill-setup``), which this command starts with the same arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import signal
import subprocess
import sys
from pathlib import Path

from gkt.distill import transfer
from gkt.distill.priming import STRATEGIES, Strategy
from gkt.launcher import DEFAULT_KEY_FILE, read_key
from shared.models import DEFAULT_STUDENT, resolve
from shared.tasks import PROMPT_STYLES, TASKS

DEFAULT_MAX_TOKENS = {"gsm8k": 320, "csqa": 128}
DISTILL_VENV = Path(__file__).resolve().parents[2] / ".venv-distill"


def _strategies(text: str) -> list[Strategy]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"strategies are {', '.join(STRATEGIES)}; got {text!r}")
    return names  # type: ignore[return-value]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="transfer sets from the cloud's teacher; LoRA training and export",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="action", required=True)
    c = dsub.add_parser("collect", help="the teacher answers the train questions under priming strategies")
    c.add_argument("--task", choices=sorted(TASKS), required=True)
    c.add_argument("--data", type=Path, required=True, help="jsonl in the dataset's format (train split is used)")
    c.add_argument("--cloud-url", required=True, help="the cloud, e.g. http://127.0.0.1:8001")
    c.add_argument("--api-key", default=None, help="an edge's key at the cloud (default: $GKT_EDGE_CLOUD_API_KEY, "
                   f"else the key `gkt up` keeps in {DEFAULT_KEY_FILE})")
    c.add_argument("--strategies", type=_strategies, default=list(STRATEGIES),
                   help=f"comma-separated priming strategies (default {','.join(STRATEGIES)})")
    c.add_argument("-n", "--questions", type=int, default=None, help="train questions to use (default all)")
    c.add_argument("--seed", type=int, default=0, help="which n questions (a smaller n is a prefix of a larger)")
    c.add_argument("--out", type=Path, required=True, help="the transfer set (jsonl, appended; rerun continues)")
    c.add_argument("--workers", type=int, default=8, help="requests in flight (the cloud batches them)")
    c.add_argument("--max-tokens", type=int, default=None, help=f"answer budget (default {DEFAULT_MAX_TOKENS})")
    c.add_argument("--top-logprobs", type=int, default=8,
                   help="teacher top-k per token, kept where the student shares the teacher's tokenizer (0: off)")
    c.add_argument("--student", default=DEFAULT_STUDENT,
                   help="the student (registry name or GGUF) whose tokenizer decides whether top-k is kept")
    c.add_argument("--style", choices=PROMPT_STYLES, default="zero_shot",
                   help="the student's prompt, in training and at inference (default zero_shot)")
    c.add_argument("--teacher-style", choices=PROMPT_STYLES, default="few_shot",
                   help="the prompt the priming wraps for the teacher (default few_shot: the task's usual prompt, "
                   "whose exemplars keep the answers short and in the answer format; the student still learns "
                   "from --style)")
    c.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    c.set_defaults(func=collect)
    for name, what in (("train", "LoRA training of the student (.venv-distill; --help there)"),
                       ("export", "a trained adapter to GGUF (.venv-distill; --help there)")):
        t = dsub.add_parser(name, help=what, add_help=False)
        t.add_argument("args", nargs=argparse.REMAINDER)
        t.set_defaults(func=lambda a, name=name: delegate(name, a.args))


DELEGATED = {"train": "gkt.distill.train", "export": "gkt.distill.export"}


def delegate(action: str, argv: list[str]) -> int:
    """Run the torch side (``train``, ``export``) in its own environment with the same arguments (gkt/cli.py
    sends them here before its own parser, which would take ``--help`` for itself)."""
    python = Path(os.environ.get("GKT_DISTILL_PYTHON") or DISTILL_VENV / "bin" / "python")
    if not python.exists():
        print(f"gkt distill: {python} is missing; run `make distill-setup` first", file=sys.stderr)
        return 2
    env = {**os.environ, "GKT_LLAMA_CPP_VERSION": importlib.metadata.version("llama-cpp-python")}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.call([str(python), "-m", DELEGATED[action], *argv], env=env)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # `kill` stops a background collection as cleanly as Ctrl-C: every answer is kept


def collect(args: argparse.Namespace) -> int:
    from gkt.distill import collect as col

    task = TASKS[args.task]
    key = args.api_key or os.environ.get("GKT_EDGE_CLOUD_API_KEY") or read_key(DEFAULT_KEY_FILE)
    if not key:
        print("gkt distill collect: no key for the cloud (--api-key or $GKT_EDGE_CLOUD_API_KEY)", file=sys.stderr)
        return 2
    top = args.top_logprobs if args.top_logprobs > 0 else None
    jobs = col.plan(task, args.data, args.strategies, args.questions, args.seed)
    vocab = col.StudentVocab(resolve(args.student)) if top is not None else None
    collector = col.Collector(task, args.cloud_url, key, max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS[args.task],
                              top_logprobs=top, style=args.style, teacher_style=args.teacher_style, vocab=vocab,
                              timeout=args.timeout)
    signal.signal(signal.SIGTERM, _interrupt)

    async def go() -> object:
        try:
            return await col.run(collector, jobs, args.out, args.workers)
        finally:
            await collector.aclose()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        print(f"\ngkt distill collect: interrupted; {args.out} keeps every answer so far; run the same command to "
              "continue", file=sys.stderr)
        return 130
    except (col.CollectError, transfer.TransferSetError) as err:
        print(f"gkt distill collect: {err}", file=sys.stderr)
        return 1
    finally:
        if vocab is not None:
            vocab.close()
    if collector.retried:
        print(f"gkt distill collect: {collector.retried} requests sent again after a timeout or a busy cloud",
              file=sys.stderr)
    print(f"{'strategy':14} {'answers':>8} {'kept':>6} {'yield':>7} {'top-k':>6} {'teacher tokens':>15}")
    for row in col.yields(args.out, args.strategies, task.name):
        print(f"{row['strategy']:14} {row['answers']:8d} {row['kept']:6d} {row['yield']:7.1%} "
              f"{row['with_logprobs']:6d} {row['teacher_tokens']:15d}")
    return 0
