"""Convert a GGUF file into a bf16 safetensors folder that vLLM can load (vLLM 0.32 no longer reads GGUF).

Runs in the vLLM virtualenv (``make vllm-setup``), which has transformers, gguf and accelerate; it does not
import gkt. The quantized weights are dequantized by transformers (``GgufConfig(dequantize=True)``); the
tokenizer and chat template come from the GGUF's own metadata, so the converted model renders chats the way
the llama.cpp build of the same file does.

    python deploy/vllm/convert_gguf.py MODEL.gguf OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    quant = GgufConfig(gguf_file=gguf.name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=quant, dtype=torch.bfloat16
    )
    # The saved folder holds plain bf16 weights: a leftover quantization_config would make vLLM look
    # for a GGUF quantization method it does not have.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
    (tmp / "gkt-source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # only a complete folder ever appears under the final name
    print(f"converted {gguf.name} -> {out} in {time.monotonic() - t0:.1f}s", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args()
    stamp = args.out / "gkt-source.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("size") == args.gguf.stat().st_size:
        print(f"{args.out} is up to date")
        return 0
    convert(args.gguf.resolve(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
