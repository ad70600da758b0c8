"""``gkt distill train``: a LoRA adapter for the student from a transfer set (or the gold solutions), on CPU.

Runs in ``.venv-distill``. The student's GGUF is dequantized once (student.py); peft puts LoRA on the attention
and MLP projections (not ``lm_head``: Qwen ties it to the embeddings, and llama.cpp rejects such an adapter).
Each optimizer step runs ``grad_accum`` micro-batches of ``batch_size`` lessons (bf16 autocast where the CPU has
bf16 instructions, float32 elsewhere); the data order is a fixed function of (seed, epoch), so the step number
alone says where in the data a run is. Every
``checkpoint_every`` steps, and at the end, a checkpoint is written atomically (checkpoint.py); running the same
command again after a kill (even ``kill -9``) resumes from it and reaches the same adapter. At the end the
adapter is saved in peft's format and exported to GGUF (export.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from shared.models import DEFAULT_STUDENT
    from shared.tasks import PROMPT_STYLES, TASKS

    p = argparse.ArgumentParser(prog="gkt distill train", description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--source", choices=["transfer", "gold"], default="transfer",
                   help="lessons from transfer sets (distillation) or the dataset's gold solutions (fine-tuning)")
    p.add_argument("--transfer", type=Path, action="append", default=[], help="transfer set (repeatable)")
    p.add_argument("--strategies", default=None, help="comma-separated strategies to learn from (default all)")
    p.add_argument("--data", type=Path, help="with --source gold: the dataset (its train split is used)")
    p.add_argument("--style", choices=PROMPT_STYLES, default="zero_shot", help="with --source gold: the prompt")
    p.add_argument("--student", default=DEFAULT_STUDENT, help="registry name or GGUF path")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, progress, adapter, GGUF")
    p.add_argument("--name", default=None, help="adapter name (default: the run folder's name)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of CE against the teacher's text (1: no KL)")
    p.add_argument("--temperature", type=float, default=2.0, help="KL temperature T")
    p.add_argument("--top-k", type=int, default=8, help="teacher top-k entries used per token")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps, then cosine decay to 0")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--max-len", type=int, default=512, help="longer lessons are dropped (and counted)")
    p.add_argument("-n", "--lessons", type=int, default=None, help="use only the first n lessons")
    p.add_argument("--checkpoint-every", type=int, default=20, help="optimizer steps between checkpoints")
    p.add_argument("--seed", type=int, default=0,
                   help="data order and dropout; with --source gold also which questions (as collect's --seed)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--nice", type=int, default=10, help="added niceness (training shares the machine)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast or float32; auto: bf16 where the CPU has bf16 instructions (AVX512_BF16 or "
                   "AMX), float32 elsewhere (emulated bf16 ran 3-10x slower than float32 on an AVX2-only CPU)")
    p.add_argument("--no-export", dest="export", action="store_false", help="stop at the peft adapter")
    args = p.parse_args(argv)
    if args.source == "transfer" and not args.transfer:
        p.error("--source transfer needs at least one --transfer file")
    if args.source == "gold" and not args.data:
        p.error("--source gold needs --data")
    return args


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (threads, niceness and export do not change the result)."""
    skip = {"out", "threads", "nice", "export", "name", "precision"}
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
            for k, v in vars(args).items() if k not in skip}


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (else torch emulates it, slower than float32)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _lr_lambda(warmup: int, total: int):  # noqa: ANN202 - a closure for LambdaLR
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def train(args: argparse.Namespace) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gkt.distill import checkpoint, data
    from gkt.distill.loss import distill_loss
    from gkt.distill.student import prepare
    from gkt.eval.progress import Progress
    from shared.models import resolve

    os.nice(args.nice)
    torch.set_num_threads(args.threads)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and native_bf16())
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    strategies = args.strategies.split(",") if args.strategies else None
    # A bad line stops us before any heavy work.
    texts = (data.from_transfer(args.transfer, args.task, strategies) if args.source == "transfer"
             else data.from_gold(args.task, args.data, args.style, args.seed))
    gguf = resolve(args.student)
    base_dir, base_sha = prepare(gguf, log=lambda m: print(m, file=sys.stderr))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    samples, stats = data.tokenize(texts[: args.lessons], tokenizer, args.max_len)
    if not samples:
        raise SystemExit(f"gkt distill train: no lessons to learn from ({stats})")
    print(f"lessons: {stats}; {'bf16 autocast' if bf16 else 'float32'}", file=sys.stderr)
    per_step = args.batch_size * args.grad_accum
    total = args.max_steps or max(1, math.ceil(args.epochs * len(samples) / per_step))
    config = {**_config(args), "data": data.fingerprint(samples), "total_steps": total}

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.config.use_cache = False
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    lora = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)  # the adapter's initial weights
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.warmup, total))
    ckpt_path = out / "checkpoint.pt"
    state = checkpoint.load(ckpt_path)
    step, totals = 0, {"tokens": 0, "seconds": 0.0}
    if state is not None:
        if state["config"] != config:
            changed = sorted(k for k in config if state["config"].get(k) != config.get(k))
            raise SystemExit(f"gkt distill train: {ckpt_path} is from another run (differs in {', '.join(changed)});"
                             " use another --out or delete it")
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        step, totals = state["step"], state["totals"]
        print(f"resuming from step {step} of {total}", file=sys.stderr)
    else:
        torch.manual_seed(args.seed + 1)  # dropout's stream, saved and restored from here on

    n = len(samples)
    orders: dict[int, list[int]] = {}

    def lesson(k: int) -> data.Sample:  # the k-th lesson of the whole run: epochs are seeded permutations
        epoch = k // n
        if epoch not in orders:
            gen = torch.Generator().manual_seed(args.seed * 7919 + epoch)
            orders[epoch] = torch.randperm(n, generator=gen).tolist()
        return samples[orders[epoch][k % n]]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    progress = Progress(total, step)
    log = open(out / "progress.jsonl", "a", encoding="utf-8")
    model.train()
    while step < total:
        t0 = time.monotonic()
        micro = [[lesson(step * per_step + m * args.batch_size + b) for b in range(args.batch_size)]
                 for m in range(args.grad_accum)]
        n_answer = sum(sum(t != -100 for t in s.targets) for batch in micro for s in batch)
        sums = {"ce": 0.0, "kl": 0.0, "tokens": 0, "kl_tokens": 0, "seen": 0}
        for batch in micro:
            b = data.collate(batch, pad, args.top_k)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            parts = distill_loss(logits, b["labels"], b["top_ids"], b["top_lp"], b["top_mask"], alpha=args.alpha,
                                 temperature=args.temperature, n_tokens=n_answer)
            parts.total.backward()
            sums["ce"] += parts.ce
            sums["kl"] += parts.kl
            sums["tokens"] += parts.tokens
            sums["kl_tokens"] += parts.kl_tokens
            sums["seen"] += int(b["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.monotonic() - t0
        totals["tokens"] += sums["seen"]
        totals["seconds"] += dt
        ce, kl = sums["ce"] / max(1, sums["tokens"]), sums["kl"] / max(1, sums["kl_tokens"])
        row = {"step": step, "total": total, "ce": ce, "kl": kl if sums["kl_tokens"] else None,
               "lr": scheduler.get_last_lr()[0], "tokens": sums["seen"], "tokens_per_s": sums["seen"] / dt,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        log.write(json.dumps(row) + "\n")
        log.flush()
        progress.advance(f"ce {ce:.3f}" + (f" kl {kl:.3f}" if sums["kl_tokens"] else "")
                         + f" {row['tokens_per_s']:.0f} tok/s")
        if step % args.checkpoint_every == 0 or step == total:
            checkpoint.atomic_save({"config": config, "step": step, "totals": totals,
                                    "adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict(), "rng": checkpoint.rng_state()}, ckpt_path)
    log.close()
    adapter = _save_adapter(model, out)
    info = {**config, "steps": step, "tokens": totals["tokens"], "train_seconds": round(totals["seconds"], 1),
            "tokens_per_s": round(totals["tokens"] / max(1e-9, totals["seconds"]), 1), "lessons": stats,
            "lora_targets": targets, "precision": "bf16" if bf16 else "fp32",
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    (out / "training.json").write_text(json.dumps(info, indent=2))
    print(f"trained {step} steps, {info['tokens_per_s']} tokens/s, peak RSS {info['peak_rss_mb']} MB; "
          f"adapter in {adapter}", file=sys.stderr)
    if args.export:
        from gkt.distill.export import export

        export(adapter, base_dir, gguf, base_sha, out / f"{args.name or out.name}.gguf", info)
    return adapter


def _save_adapter(model: Any, out: Path) -> Path:
    """peft's folder, replaced whole (a reader never sees half of it)."""
    import shutil

    final, tmp = out / "adapter", out / f".adapter.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    old = out / f".adapter.{os.getpid()}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    from gkt.distill.transfer import TransferSetError

    try:
        train(parse_args(argv))
    except TransferSetError as err:
        print(f"gkt distill train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ngkt distill train: interrupted; run the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
