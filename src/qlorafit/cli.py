"""The `qlorafit` command: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .errors import QlorafitError


def _merge(args: argparse.Namespace) -> None:
    from . import load_adapter, load_model, save_merged

    model, tokenizer = load_model(args.model, quant=args.quant)
    load_adapter(model, args.adapter)
    out = save_merged(model, tokenizer, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model written to {out}")


def _demo(args: argparse.Namespace) -> None:
    from . import add_lora, load_model, lora_summary

    start = time.perf_counter()
    model, tok = load_model("smollm2-135m-instruct", quant="nf4")
    print(f"loaded SmolLM2-135M-Instruct in NF4 with double quantization in {time.perf_counter() - start:.1f} s")
    add_lora(model, r=16, alpha=32, targets="all-linear")
    print(lora_summary(model))
    prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    print(f"prompt: {args.prompt}\nanswer: {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()}")
    print("Fine-tuning on the bundled task is not yet part of the demo: it arrives with the trainer.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlorafit", description="LoRA and QLoRA fine-tuning of causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="fold an adapter into its base model and write a Hugging Face folder")
    merge.add_argument("--model", required=True, help="HF folder, .gguf file, bnb-4bit folder or alias")
    merge.add_argument("--adapter", required=True, help="adapter folder in PEFT layout")
    merge.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    merge.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                       help="dtype of the written weights (default float32)")
    merge.add_argument("--quant", default="none", choices=["none", "nf4", "fp4"],
                       help="how to hold the base while merging; 'none' keeps full precision (default)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    merge.set_defaults(func=_merge)

    demo = sub.add_parser("demo", help="load SmolLM2-135M-Instruct in NF4, add LoRA and answer a prompt")
    demo.add_argument("--prompt", default="What is the capital of France?", help="question to answer")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except QlorafitError as exc:
        print(f"qlorafit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
