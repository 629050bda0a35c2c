"""The `qlorafit` command: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from . import progress
from .allocator import ALLOCATORS, preload_allocator
from .errors import QlorafitError, TrainingInterrupted

DEMO_OUT, DEMO_STEPS = "runs/demo", 25
MODEL_HELP = "HF model folder, .gguf file, bitsandbytes 4-bit folder, or alias (smollm2-135m-instruct)"


class _Progress:
    """Training log rows (step, loss, lr, tokens/s) as a tqdm bar with an ETA on a terminal, or as
    a line every few percent of the steps in a log; nothing with --quiet."""

    def __init__(self) -> None:
        self.bar = None
        self.logged = -1

    def __call__(self, row: dict) -> None:
        from tqdm import tqdm

        if not progress.enabled():
            return
        if "loss" in row and not progress.on_terminal():
            total = row.get("total_steps") or 0
            percent = 100 * row["step"] // total if total else 0
            if percent // progress.LOG_STEP > self.logged or row["step"] == total:
                self.logged = percent // progress.LOG_STEP
                print(f"step {row['step']}/{total}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, "
                      f"{row['tokens_per_s']:.0f} tokens/s, {row['elapsed_s']:.0f} s", file=sys.stderr, flush=True)
        elif "loss" in row:
            if self.bar is None:
                # starts at this step: the rate and ETA count from here (a bar that first jumped a
                # whole step in no time would show a nonsense rate)
                self.bar = tqdm(total=row.get("total_steps"), initial=row["step"], unit="step", dynamic_ncols=True)
            self.bar.update(row["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        elif "eval_loss" in row:
            self.write(f"step {row['step']}: eval loss {row['eval_loss']:.4f}, perplexity {row['eval_ppl']:.2f}")

    def write(self, text: str) -> None:
        from tqdm import tqdm

        if self.bar is not None:
            tqdm.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _CountBar:
    """Progress fed by `on_progress(done, total)` calls (a bar, or log lines); closes itself at the end."""

    def __init__(self, desc: str, unit: str = "prompt") -> None:
        self.desc, self.unit, self.bar, self.done = desc, unit, None, 0

    def __call__(self, done: int, total: int) -> None:
        if not progress.enabled():
            return
        if self.bar is None:
            self.bar, self.done = progress.display(self.desc, total, self.unit), 0
        self.bar.update(done - self.done)
        self.done = done
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _load(args: argparse.Namespace):
    from . import load_adapter, load_model

    model, tokenizer = load_model(args.model, quant=args.quant, allow_pickle=args.allow_pickle,
                                  trust_remote_code=args.trust_remote_code)
    if args.adapter:
        load_adapter(model, args.adapter)
    if tokenizer is None:
        raise QlorafitError(f"{args.model}: has no tokenizer files")
    return model, tokenizer


def _torchrun(args: argparse.Namespace) -> None:
    """Replace this process by torchrun's launcher running the same `train` on `--nproc` processes."""
    from .train.distributed import torchrun_command

    argv = (["-v"] if args.verbose else []) + (["-q"] if args.quiet else []) + \
        ([f"--allocator={args.allocator}"] if args.allocator else [])
    argv += ["train", args.config, *(f"--set={s}" for s in args.set)]
    argv += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
    argv += ["--allow-config-change"] * args.allow_config_change
    command, env = torchrun_command(args.nproc, argv)
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


def _train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train.distributed import is_main_process, launched
    from .train.run import run_training

    config = load_config(args.config, args.set)  # errors surface before any process starts
    if args.nproc is not None and args.nproc < 1:
        raise QlorafitError(f"--nproc {args.nproc}: give a number of processes, 1 or more")
    if args.nproc and args.nproc > 1 and not launched():
        _torchrun(args)
    progress = _Progress()
    try:
        summary = run_training(config, resume=args.resume, overwrite=args.overwrite, on_log=progress,
                               allow_config_change=args.allow_config_change)
    finally:
        progress.close()
    if is_main_process():
        print(run_summary(summary))


def run_summary(s: dict) -> str:
    """What a finished `train` did, where its files are, and the commands that use the adapter."""
    skipped = f" ({s['skipped_steps']} skipped)" if s.get("skipped_steps") else ""
    memory = f"peak memory {s['peak_rss_mib'] / 1024:.2f} GiB" + (
        f" (GPU {s['peak_gpu_mib'] / 1024:.2f} GiB)" if s.get("peak_gpu_mib") else "")
    per_process = " per process" if s.get("processes", 1) > 1 else ""
    session = "" if s["steps_run"] == s["steps"] else f"; {s['steps_run']} of them now, after resuming"
    lines = [
        f"trained {s['steps']} steps{skipped}{session}: {s['tokens']:,} tokens in {s['train_s'] / 60:.1f} min, "
        f"{s['tokens_per_s']:,.0f} tokens/s; {memory}{per_process}",
        f"final train loss {s['train_loss']:.4f}" + (
            f", eval loss {s['eval_loss']:.4f} (perplexity {s['eval_ppl']:.2f})" if "eval_loss" in s else ""),
        f"adapter: {s['adapter']}\nmetrics: {s['metrics']}\nloss curve: {s['plot']}",
        "next:",
    ]
    model, adapter = shlex.quote(s["model"]), shlex.quote(s["adapter"])
    data = shlex.quote(s["eval_data"]) if s.get("eval_data") else "EVAL.jsonl"
    lines += [f"  qlorafit eval --model {model} --adapter {adapter} --data {data} --metric exact_match",
              f"  qlorafit generate --model {model} --adapter {adapter} --chat",
              f"  qlorafit export --model {model} --adapter {adapter} --out model.gguf --type q4_k_m"]
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> None:
    from .data.dataset import load_dataset
    from .data.sources import read_records
    from .evaluate import eval_loss, exact_match, write_predictions

    model, tokenizer = _load(args)
    if args.metric == "loss":
        data = load_dataset(args.data, tokenizer, max_length=args.max_length)
        result = eval_loss(model, data.examples, pad_id=tokenizer.pad_token_id or 0)
        print(f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} over {result['tokens']} tokens")
        return
    bar = _CountBar("exact match")
    try:
        accuracy, predictions = exact_match(model, tokenizer, read_records(args.data),
                                            max_new_tokens=args.max_new_tokens, on_progress=bar)
    finally:
        bar.close()
    if args.out:
        write_predictions(args.out, predictions)
        print(f"predictions written to {args.out}")
    print(f"exact match: {accuracy:.1%} ({sum(p['correct'] for p in predictions)}/{len(predictions)})")


def _generate(args: argparse.Namespace) -> None:
    from .generate import encode_prompt, generate_tokens, stop_token_ids, stream_text
    from .inference import dequantized_for_inference

    model, tokenizer = _load(args)

    def answer(prompt) -> str:
        ids = encode_prompt(tokenizer, prompt)
        tokens = generate_tokens(model, ids, args.max_new_tokens, args.temperature, args.top_p,
                                 stop_token_ids(tokenizer), args.seed)
        pieces = []
        for piece in stream_text(tokenizer, tokens):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        return "".join(pieces)

    with dequantized_for_inference(model):  # once for the whole chat, not once per answer
        if not args.chat:
            answer(args.prompt)
            return
        history: list[dict] = []
        while True:
            try:
                line = input("you> ")
            except EOFError:
                return
            if line.strip() in ("", "/exit", "/quit"):
                return
            history.append({"role": "user", "content": line})
            print("model> ", end="", flush=True)
            history.append({"role": "assistant", "content": answer(history)})


def _merge(args: argparse.Namespace) -> None:
    from . import load_adapter, load_model, save_merged

    model, tokenizer = load_model(args.model, quant=args.quant, allow_pickle=args.allow_pickle,
                                  trust_remote_code=args.trust_remote_code)
    load_adapter(model, args.adapter)
    out = save_merged(model, tokenizer, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model written to {out}")


def _run_quant(adapter: str | None) -> str:
    """The base quantization the adapter was trained on: its run's config.yaml, else none (float)."""
    if adapter:
        run_config = Path(adapter).parent / "config.yaml"
        if run_config.is_file():
            import yaml

            try:
                quant = (yaml.safe_load(run_config.read_text()) or {}).get("quant", {})
            except yaml.YAMLError:
                return "none"
            if isinstance(quant, dict) and quant.get("type") in ("nf4", "fp4", "none"):
                return quant["type"]
    return "none"


def _export(args: argparse.Namespace) -> None:
    from . import load_adapter, load_model
    from .export.gguf import export_gguf
    from .export.gguf_lora import export_lora_gguf

    if args.lora_only and not args.adapter:
        raise QlorafitError("--lora-only writes an adapter file: give the adapter folder with --adapter")
    if args.lora_only and args.ollama and not str(args.model).endswith(".gguf"):
        raise QlorafitError("an Ollama Modelfile with an adapter needs the base model as a GGUF file: "
                            "give --model <base>.gguf, or export the merged model without --lora-only")
    quant = _run_quant(args.adapter) if args.quant == "auto" else args.quant
    model, tokenizer = load_model(args.model, quant=quant, allow_pickle=args.allow_pickle,
                                  trust_remote_code=args.trust_remote_code)
    if args.adapter:
        load_adapter(model, args.adapter)
        if (Path(args.adapter) / "tokenizer_config.json").is_file():  # the run saves the tokenizer it trained with
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    template = args.chat_template
    if template is not None and "{" not in template and Path(template).is_file():  # a file, not a Jinja text
        template = Path(template).read_text()
    if args.ollama:  # a template or system prompt the Modelfile cannot carry fails before the export's work
        from .export.ollama import modelfile_template, write_modelfile

        modelfile_template(tokenizer, template, args.system)
    if args.lora_only:
        out = export_lora_gguf(model, args.out, args.type or "f16")
        print(f"LoRA adapter written to {out} (apply with: llama-cli -m <base model GGUF> --lora {out})")
    else:
        out = export_gguf(model, tokenizer, args.out, args.type or "q8_0", chat_template=template)
        print(f"model written to {out}")
    if args.ollama:
        if args.lora_only:
            modelfile = write_modelfile(Path(args.ollama), Path(args.model), tokenizer, chat_template=template,
                                        system=args.system, adapter_file=out)
        else:
            modelfile = write_modelfile(Path(args.ollama), out, tokenizer, chat_template=template, system=args.system)
        print(f"Ollama Modelfile written to {modelfile} (then: ollama create <name> -f {modelfile})")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    start = time.perf_counter()
    progress, eval_bar = _Progress(), _CountBar("evaluating")

    def status(text: str) -> None:  # a new phase: the training bar (if any) is finished
        progress.close()
        progress.write(text)

    try:
        result = run_demo(Path(args.out), args.steps, on_status=status, on_log=progress, on_progress=eval_bar,
                          resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as exc:
        command = sys.argv[0] if Path(sys.argv[0]).name == "qlorafit" else "qlorafit"
        again = f"{command} demo --resume" + (f" --out {args.out}" if args.out != DEMO_OUT else "") + \
            (f" --steps {args.steps}" if args.steps != DEMO_STEPS else "")
        raise TrainingInterrupted(f"{str(exc).split(';')[0]}; continue with: {again}", exc.signum) from exc
    finally:
        eval_bar.close()
        progress.close()
    minutes = (time.perf_counter() - start) / 60
    print(f"\nheld-out exact match on {result['examples']} examples: before {result['before']:.0%}, "
          f"after {result['after']:.0%}  ({minutes:.1f} min)")
    print(f"loss curve: {result['plot']}\nadapter: {result['adapter']}\n"
          f"predictions: {Path(args.out) / 'predictions-after.jsonl'}")
    print(f"run it in llama.cpp or Ollama: qlorafit export --model smollm2-135m-instruct --adapter {result['adapter']} "
          f"--out {Path(args.out) / 'smollm2-demo-q8_0.gguf'} --ollama {Path(args.out) / 'ollama'}")


def _plan(args: argparse.Namespace) -> None:
    from .models.checkpoint import resolve_model
    from .plan import plan, shape_from_config, shape_from_params

    if args.model:
        shape = shape_from_config(resolve_model(args.model).config, name=args.model)
    else:
        shape = shape_from_params(_parse_count(args.params))
    result = plan(shape, method=args.method, batch=args.batch, seq=args.seq, rank=args.rank, optimizer=args.optimizer,
                  grad_checkpointing=args.grad_checkpointing, device=args.device, devices=args.devices,
                  strategy=args.strategy)
    print(result.table())


def _parse_count(text: str) -> float:
    """'7B', '135M', '6.7e9' -> a parameter count."""
    t = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(t[-1:], 1.0)
    try:
        return float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise QlorafitError(f"--params {text!r}: write a count like 7B, 135M or 6.7e9") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", help="adapter folder in PEFT layout (optional)")
    p.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"], help="how to hold the base (default nf4)")
    _add_trust_args(p)


def _add_trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model*.bin weights (with torch.load weights_only=True); refused otherwise")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the model (only for code you have read)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlorafit", description="LoRA and QLoRA fine-tuning of causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress output (bars on a terminal, a line every few percent in a log)")
    parser.add_argument("--allocator", choices=("auto", "system", *ALLOCATORS), default=None,
                        help="memory allocator for train/eval/generate/merge/demo: auto (tcmalloc when installed, "
                             "the default; or $QLORAFIT_ALLOCATOR), system (the platform's malloc), or one by name")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune as a YAML config says (see docs/config.md)")
    train.add_argument("config", help="YAML config file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    train.add_argument("--allow-config-change", action="store_true",
                       help="with --resume: continue even though settings or training data changed (no longer exact)")
    train.add_argument("--nproc", type=int, metavar="N",
                       help="train on N processes of this machine (starts torchrun; one per GPU, or sharing the cores)")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="loss/perplexity or exact-match accuracy on a JSONL file")
    _add_model_args(ev)
    ev.add_argument("--data", required=True, help="JSONL file of records")
    ev.add_argument("--metric", default="loss", choices=["loss", "exact_match"], help="what to measure (default loss)")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit for exact_match")
    ev.add_argument("--max-length", type=int, default=512, help="token limit per record for loss")
    ev.add_argument("--out", help="write each exact_match prediction to this JSONL file")
    ev.set_defaults(func=_eval)

    gen = sub.add_parser("generate", help="answer a prompt (or chat), streaming tokens as they come")
    _add_model_args(gen)
    mode = gen.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="plain text to continue")
    mode.add_argument("--chat", action="store_true", help="interactive chat with the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.set_defaults(func=_generate)

    merge = sub.add_parser("merge", help="fold an adapter into its base model and write a Hugging Face folder")
    merge.add_argument("--model", required=True, help=MODEL_HELP)
    merge.add_argument("--adapter", required=True, help="adapter folder in PEFT layout")
    merge.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    merge.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                       help="dtype of the written weights (default float32)")
    merge.add_argument("--quant", default="none", choices=["none", "nf4", "fp4"],
                       help="how to hold the base while merging; 'none' keeps full precision (default)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    _add_trust_args(merge)
    merge.set_defaults(func=_merge)

    ex = sub.add_parser("export", help="write the model (or only its LoRA adapter) as GGUF for llama.cpp and Ollama")
    ex.add_argument("--model", required=True, help=MODEL_HELP)
    ex.add_argument("--adapter", help="adapter folder in PEFT layout (merged into the model unless --lora-only)")
    ex.add_argument("--out", required=True, help="the GGUF file to write")
    ex.add_argument("--type", default=None,
                    help="model: f32, f16, bf16, q8_0 (default), q4_0, q4_k_m; adapter: f32, f16 (default), bf16")
    ex.add_argument("--lora-only", action="store_true", help="write only the adapter, as a llama.cpp LoRA GGUF")
    ex.add_argument("--quant", default="auto", choices=["auto", "none", "nf4", "fp4"],
                    help="how the base is held before merging; auto: as the adapter's run trained it (its "
                         "config.yaml), else full precision")
    ex.add_argument("--chat-template", help="chat template (a Jinja string or a file) to write instead of the "
                                            "tokenizer's (default: the one the run trained with)")
    ex.add_argument("--ollama", metavar="DIR", help="also write an Ollama Modelfile into DIR")
    ex.add_argument("--system", help="system prompt for the Ollama Modelfile")
    _add_trust_args(ex)
    ex.set_defaults(func=_export)

    pl = sub.add_parser("plan", help="predict a run's memory (weights, adapters, optimizer, activations) and whether it fits")
    which = pl.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help=MODEL_HELP + " (only its config is read)")
    which.add_argument("--params", help="size of a Llama-shaped model instead, e.g. 7B, 65B, 135M")
    pl.add_argument("--method", default="qlora", choices=["qlora", "lora", "full"], help="default qlora")
    pl.add_argument("--seq", type=int, default=512, help="tokens per example (default 512)")
    pl.add_argument("--batch", type=int, default=4, help="examples per micro-batch (default 4)")
    pl.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    pl.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"])
    pl.add_argument("--grad-checkpointing", action="store_true", help="plan with activation checkpointing on")
    pl.add_argument("--device", default="cpu", help="cpu, cuda, or a size: cpu:16GB, cuda:24GB (default: this CPU)")
    pl.add_argument("--devices", type=int, default=1, help="processes training together, one per device (default 1)")
    pl.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"],
                    help="with several devices: ddp holds the whole base on each, fsdp shards it (default ddp)")
    pl.set_defaults(func=_plan)

    demo = sub.add_parser("demo", help="fine-tune SmolLM2-135M-Instruct on a bundled task; accuracy before/after")
    demo.add_argument("--out", default=DEMO_OUT, help=f"folder for data, run and predictions (default {DEMO_OUT})")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"optimizer steps (default {DEMO_STEPS})")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo from its last checkpoint")
    demo.add_argument("--overwrite", action="store_true", help="start over, replacing an interrupted demo run")
    demo.set_defaults(func=_demo)
    return parser


# commands that run a model: worth a restart under a better allocator
_HEAVY = {"train", "eval", "generate", "merge", "export", "demo"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in _HEAVY:  # the installed command, not a call from Python
        preload_allocator(sys.argv[1:], args.allocator)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        with progress.reporting(not args.quiet and os.environ.get("RANK", "0") == "0"):  # rank 0 alone reports
            args.func(args)
    except TrainingInterrupted as exc:
        from .train.distributed import is_main_process

        if is_main_process():  # the other ranks stopped at the same step with it
            print(f"\nqlorafit: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except QlorafitError as exc:
        print(f"qlorafit: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file problem outside qlorafit's own checks: still a message, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"qlorafit: error: {where}{exc.strerror or exc}; check the path, its permissions and the free space",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nqlorafit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
