"""``gkt ask "question"``: stream one answer from the edge, guidance marked, then the timings."""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx

from gkt.launcher import CLIENT_KEY_FILE, read_key

_TEACHER = "\033[1;36m"  # bold cyan: the teacher's guidance
_RESET = "\033[0m"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask the edge a question and show who wrote what")
    p.add_argument("question")
    p.add_argument("--edge", default=os.environ.get("GKT_EDGE_URL", "http://127.0.0.1:8002"))
    p.add_argument("--mode", choices=["gkt", "student", "teacher"], default=None)
    p.add_argument("-k", "--guidance-tokens", type=int, default=None)
    p.add_argument("--task", choices=["gsm8k", "csqa"], default=None)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", default=None,
                   help="the edge's client key (default: $GKT_EDGE_API_KEY, else the key `gkt up` keeps in "
                   f"{CLIENT_KEY_FILE})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()
    body: dict = {"messages": [{"role": "user", "content": args.question}], "stream": True,
                  "max_tokens": args.max_tokens, "temperature": args.temperature}
    for key in ("mode", "guidance_tokens", "task"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    key = args.api_key or os.environ.get("GKT_EDGE_API_KEY") or read_key(CLIENT_KEY_FILE)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    summary: dict | None = None
    source = None
    try:
        with httpx.stream("POST", f"{args.edge}/v1/chat/completions", json=body, headers=headers,
                          timeout=httpx.Timeout(10.0, read=300.0)) as resp:
            if resp.status_code != 200:
                print(f"error {resp.status_code}: {resp.read().decode(errors='replace')}", file=sys.stderr)
                return 1
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    print(f"\nerror: {chunk['error']['message']}", file=sys.stderr)
                    return 1
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        new = chunk.get("gkt", {}).get("source")
                        if new != source:
                            if tty:
                                sys.stdout.write(_TEACHER if new == "teacher" else _RESET)
                            else:
                                sys.stdout.write("[[" if new == "teacher" else ("]]" if source == "teacher" else ""))
                            source = new
                        sys.stdout.write(text)
                        sys.stdout.flush()
                    if choice.get("finish_reason"):
                        summary = chunk.get("gkt")
    except httpx.HTTPError as exc:
        print(f"cannot reach the edge at {args.edge}: {exc}", file=sys.stderr)
        return 1
    if source == "teacher":
        sys.stdout.write(_RESET if tty else "]]")
    print()
    if summary:
        _print_summary(summary, tty)
    return 0


def _print_summary(s: dict, tty: bool) -> None:
    u, t = s["usage"], s["timings"]
    legend = f"{_TEACHER}teacher{_RESET}" if tty else "[[teacher]]"
    print(f"\n--- mode {s['mode']}: {legend} {s.get('teacher_model') or '-'} -> student {s['student_model']}")
    if s.get("fallback"):
        print(f"    cloud unavailable ({s['fallback']}): the student answered alone")
    if s.get("partial"):
        print("    guidance stream broke: the student continued from the partial guidance")
    print(f"    tokens: teacher {u['teacher_tokens']} (prompt {u['teacher_prompt_tokens']}), "
          f"student {u['student_tokens']} (prompt {u['student_prompt_tokens']})")

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}s"

    print(f"    time: cloud ttft {f(t['cloud_ttft_s'])}, guidance {f(t['guidance_s'])}, "
          f"student prompt {f(t['student_prompt_s'])}, generation {f(t['student_generation_s'])}, "
          f"total {f(t['total_s'])}")
    if s.get("answer") is not None:
        print(f"    answer ({s['task']}): {s['answer']}")
