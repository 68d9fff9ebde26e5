"""The `braid` command line."""
from __future__ import annotations

import argparse
import sys


def _offline(args) -> int:
    from braid.engine import LLM, SamplingParams
    from braid.engine.tiny import ensure_default_model

    model = args.model or ensure_default_model()
    print(f"model: {model}")
    with LLM(
        model,
        tensor_parallel_size=args.tp,
        prefill_context_parallel_size=args.pcp,
        decode_context_parallel_size=args.dcp,
        block_size=args.block_size,
        dtype=args.dtype,
    ) as llm:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        for prompt, out in zip(args.prompt, llm.generate(args.prompt, params)):
            if out.error:
                print(f"prompt {prompt!r}: rejected: {out.error}", file=sys.stderr)
                continue
            print(f"prompt: {prompt!r}")
            print(f"tokens: {out.token_ids}")
            print(f"text:   {out.text!r}  ({out.finish_reason})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="braid", description="braid: disaggregated LLM serving with context parallelism")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    off = sub.add_parser("offline", help="generate in this process with the offline engine (no cluster)")
    off.add_argument("prompt", nargs="+", help="prompt text (several prompts are batched)")
    off.add_argument("--model", help="HF checkpoint directory (default: the embedded tiny model)")
    off.add_argument("--max-tokens", type=int, default=32)
    off.add_argument("--temperature", type=float, default=0.0)
    off.add_argument("--seed", type=int, default=None)
    off.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    off.add_argument("--pcp", type=int, default=1, help="prefill context parallel size")
    off.add_argument("--dcp", type=int, default=1, help="decode context parallel size")
    off.add_argument("--block-size", type=int, default=16)
    off.add_argument("--dtype", default="float32")
    off.set_defaults(func=_offline)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as e:
        print(f"braid: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
