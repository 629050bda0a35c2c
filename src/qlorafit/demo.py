"""The demo: teach SmolLM2-135M-Instruct a structured text transformation it gets wrong.

The task turns an order sentence into one line of JSON with fixed keys, the date in ISO form:

    Order 4821: Alice Brown bought 3 items on March 5, 2021.
    -> {"order": 4821, "customer": "Alice Brown", "items": 3, "date": "2021-03-05"}

The data is generated from a seed, so every run sees the same few hundred training examples
and the same held-out ones (no sentence appears in both). The base model answers in prose or
with other keys and formats; after a few minutes of QLoRA it answers exactly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from .config import RunConfig, build_config
from .errors import QlorafitError

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FIRST = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yusuf", "Zoe"]
LAST = ["Brown", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ito", "Jensen", "Kowalski",
        "Lopez", "Moreau", "Novak", "Okafor", "Patel", "Rossi", "Schmidt", "Tanaka", "Usman", "Varga", "Weber"]
TEMPLATES = [
    "Order {order}: {name} bought {items} items on {date}.",
    "On {date}, {name} placed order {order} for {items} items.",
    "{name} ordered {items} items on {date} (order {order}).",
]
INSTRUCTION = "Convert this order to JSON with keys order, customer, items, date (YYYY-MM-DD):"


def make_example(rng: random.Random) -> dict:
    """One record in the `messages` format."""
    year, month, day = rng.randint(2015, 2025), rng.randint(1, 12), rng.randint(1, 28)
    fields = {
        "order": rng.randint(1000, 9999),
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "items": rng.randint(1, 20),
        "date": f"{MONTHS[month - 1]} {day}, {year}",
    }
    sentence = rng.choice(TEMPLATES).format(**fields)
    answer = json.dumps({"order": fields["order"], "customer": fields["name"], "items": fields["items"],
                         "date": f"{year:04d}-{month:02d}-{day:02d}"})
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n{sentence}"},
                         {"role": "assistant", "content": answer}]}


def write_demo_data(folder: Path, n_train: int = 400, n_eval: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl (disjoint) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < n_train + n_eval:
        record = make_example(rng)
        key = record["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            records.append(record)
    paths = folder / "train.jsonl", folder / "eval.jsonl"
    for path, part in zip(paths, (records[:n_train], records[n_train:]), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def demo_config(out: Path, steps: int = 25) -> RunConfig:
    """The demo's run: QLoRA NF4 on all linear layers of SmolLM2-135M-Instruct."""
    train, held_out = write_demo_data(out / "data")
    return build_config({
        "model": "smollm2-135m-instruct",
        "quant": {"type": "nf4", "double_quant": True, "blocksize": 64},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"},
        "data": {"train": str(train), "eval": str(held_out), "max_length": 160},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 2e-3, "schedule": "cosine", "warmup_steps": 5,
                  "log_every": 1, "seed": 0},
        "output_dir": str(out / "run"),
    })


def interrupted_run(run_dir: Path) -> bool:
    """True when `run_dir` holds checkpoints of a run that did not finish (no summary.json)."""
    return (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()) and \
        not (run_dir / "summary.json").is_file()


def _accuracy(path: Path) -> float | None:
    """The exact match recorded in a predictions file, or None if there is no complete one."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return sum(bool(r["correct"]) for r in rows) / len(rows) if rows else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_demo(out: Path, steps: int = 25, on_status: Callable[[str], None] = lambda s: None,
             on_log: Callable[[dict], None] | None = None,
             on_progress: Callable[[int, int], None] | None = None, resume: bool = False,
             overwrite: bool = False) -> dict:
    """Held-out exact match before and after a short QLoRA run; returns the figures and paths.

    `on_status(text)` hears of each phase, `on_log(row)` gets the training log rows and
    `on_progress(done, total)` counts the held-out examples answered in each evaluation.
    A demo interrupted during training continues with `resume` (the base model's score is read
    back); running it again without `resume` or `overwrite` is refused rather than deleting it.
    """
    from .data.sources import read_records
    from .evaluate import exact_match, write_predictions
    from .lora.peft_io import load_adapter
    from .models.load import load_model
    from .train.run import run_training

    config = demo_config(out, steps)
    run_dir = Path(config.output_dir)
    if interrupted_run(run_dir) and not (resume or overwrite):
        raise QlorafitError(f"{run_dir}: holds an interrupted demo run; continue it with `qlorafit demo --resume`, "
                            "or start over with `qlorafit demo --overwrite`")
    held_out = read_records(config.data.eval)
    before = _accuracy(out / "predictions-before.jsonl") if resume else None
    if before is None:
        on_status(f"evaluating the base model on {len(held_out)} held-out examples")
        model, tokenizer = load_model(config.model, quant="nf4")
        before, predictions = exact_match(model, tokenizer, held_out, max_new_tokens=48, on_progress=on_progress)
        write_predictions(out / "predictions-before.jsonl", predictions)
        del model
    on_status(f"base model exact match: {before:.0%}; fine-tuning for {steps} steps")
    summary = run_training(config, resume=resume and run_dir.is_dir(), overwrite=not resume, on_log=on_log)
    model, tokenizer = load_model(config.model, quant="nf4")
    load_adapter(model, summary["adapter"])
    on_status("evaluating the fine-tuned model")
    after, predictions = exact_match(model, tokenizer, held_out, max_new_tokens=48, on_progress=on_progress)
    write_predictions(out / "predictions-after.jsonl", predictions)
    return {"before": before, "after": after, "examples": len(held_out), **summary}
