"""run_training end to end on a tiny model: outputs, refusal to clobber, exact resume, determinism."""

import json
import shutil

import pytest
import torch

from qlorafit.config import build_config
from qlorafit.data.batches import pad_batch
from qlorafit.errors import QlorafitError
from qlorafit.train.run import run_training
from tests.conftest import write_chat_jsonl


def _config(model_dir, tmp_path, out="run", **train):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_chat_jsonl(data, 24)
        write_chat_jsonl(tmp_path / "eval.jsonl", 8, seed=1)
    tree = {
        "model": str(model_dir),
        "quant": {"type": "nf4"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(data), "eval": str(tmp_path / "eval.jsonl"), "max_length": 64},
        "train": {"batch_size": 4, "lr": 5e-3, "seed": 0, "log_every": 1, **train},
        "output_dir": str(tmp_path / out),
    }
    return build_config(tree)


def test_training_writes_adapter_metrics_plot_and_lowers_eval_loss(tiny_chat_model_dir, tmp_path):
    cfg = _config(tiny_chat_model_dir, tmp_path, epochs=3, eval_every=3, warmup_steps=2)
    logged = []
    summary = run_training(cfg, on_log=logged.append)
    out = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "config.yaml", "checkpoints/step-18/manifest.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 19))  # 24 examples / 4 = 6 steps x 3 epochs
    assert evals[-1] < evals[0]
    assert summary["eval_loss"] == evals[-1] and logged == rows
    assert train_rows[0]["lr"] < train_rows[2]["lr"]  # warmup


def test_existing_output_dir_is_refused_unless_resume_or_overwrite(tiny_chat_model_dir, tmp_path):
    cfg = _config(tiny_chat_model_dir, tmp_path, max_steps=1)
    run_training(cfg)
    with pytest.raises(QlorafitError, match="already holds another run; pass --resume"):
        run_training(cfg)
    run_training(cfg, overwrite=True)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(QlorafitError, match="not from a run"):
        run_training(cfg, overwrite=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_resumed_run_ends_with_the_same_adapter_bit_for_bit(tiny_chat_model_dir, tmp_path):
    straight = _config(tiny_chat_model_dir, tmp_path, out="straight", max_steps=8, grad_accum=2, save_every=3)
    run_training(straight)

    cut = _config(tiny_chat_model_dir, tmp_path, out="cut", max_steps=8, grad_accum=2, save_every=3)

    def stop_at_5(row):
        if row.get("step") == 5 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cut, on_log=stop_at_5)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-3"]
    run_training(cut, resume=True)
    a = (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "cut" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))


def test_same_seed_same_adapter_other_seed_other_adapter(tiny_chat_model_dir, tmp_path):
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = _config(tiny_chat_model_dir, tmp_path, out=name, max_steps=3, seed=seed)
        run_training(cfg)
        outs.append((tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_packing_and_gradient_checkpointing_train(tiny_chat_model_dir, tmp_path):
    from safetensors.torch import load_file

    adapters = {}
    for name, extra in (("plain", {}), ("ckpt", {"grad_checkpointing": True})):
        cfg = _config(tiny_chat_model_dir, tmp_path, out=name, max_steps=3, **extra)
        run_training(cfg)
        adapters[name] = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    # Recomputing activations in backward changes nothing (dropout masks are replayed).
    for key, value in adapters["plain"].items():
        assert torch.equal(value, adapters["ckpt"][key]), key
    cfg = _config(tiny_chat_model_dir, tmp_path, out="packed", max_steps=3)
    cfg.data.packing = True
    run_training(cfg)
    rows = [json.loads(line) for line in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    # step 1 (before any update; LoRA starts at B = 0) on packed rows is the loss of the same
    # examples each run alone: packing keeps examples apart
    import qlorafit
    from qlorafit.data.dataset import load_dataset
    from qlorafit.train.loop import Run, epoch_batches
    from qlorafit.train.loss import causal_lm_loss

    model, tokenizer = qlorafit.load_model(tiny_chat_model_dir, quant="nf4")
    data = load_dataset(cfg.data.train, tokenizer, max_length=cfg.data.max_length)
    first = epoch_batches(data, cfg.train, Run(tmp_path, 0, cfg.data.max_length, packing=True), 0)[0]
    examples = [data.examples[i] for row in first for i in row]
    assert sum(len(row) for row in first) > len(first)  # rows really hold several examples
    with torch.no_grad():
        alone = [causal_lm_loss(model, pad_batch([e], 0)) for e in examples]
    expected = sum(float(loss) for loss, _ in alone) / sum(n for _, n in alone)
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_paged_8bit_optimizer_run_equals_in_memory_8bit_and_cleans_up(tiny_chat_model_dir, tmp_path):
    adapters = {}
    for name in ("adamw8bit", "paged_adamw8bit"):
        cfg = _config(tiny_chat_model_dir, tmp_path, out=name, max_steps=3, optimizer=name, save_every=2)
        run_training(cfg)
        adapters[name] = (tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes()
        assert not (tmp_path / name / "optimizer-pages").exists()
    assert adapters["adamw8bit"] == adapters["paged_adamw8bit"]
    cut = _config(tiny_chat_model_dir, tmp_path, out="resumed", max_steps=3, optimizer="paged_adamw8bit", save_every=2)

    def stop(row):
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cut, on_log=stop)
    run_training(cut, resume=True)
    assert (tmp_path / "resumed" / "adapter" / "adapter_model.safetensors").read_bytes() == adapters["adamw8bit"]


def test_paged_adamw_run_equals_adamw_bit_for_bit(tiny_chat_model_dir, tmp_path):
    adapters = {}
    for name in ("adamw", "paged_adamw"):
        run_training(_config(tiny_chat_model_dir, tmp_path, out=name, max_steps=3, optimizer=name, weight_decay=0.01))
        adapters[name] = (tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes()
    assert adapters["adamw"] == adapters["paged_adamw"]


def test_resume_under_a_changed_config_or_data_is_refused_unless_allowed(tiny_chat_model_dir, tmp_path):
    cfg = _config(tiny_chat_model_dir, tmp_path, out="changed", max_steps=4, save_every=2)

    def stop_at_3(row):
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, on_log=stop_at_3)
    same = _config(tiny_chat_model_dir, tmp_path, out="changed", max_steps=4, save_every=2, log_every=2)
    changed = _config(tiny_chat_model_dir, tmp_path, out="changed", max_steps=4, save_every=2, lr=1e-3)
    with pytest.raises(QlorafitError, match=r"another configuration .*train\.lr: 0\.005 -> 0\.001.*--allow-config-change"):
        run_training(changed, resume=True)
    with open(tmp_path / "train.jsonl", "a") as f:  # the data changed too
        f.write(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(QlorafitError, match=r"data\.train \(sha256\)"):
        run_training(same, resume=True)
    assert sorted(p.name for p in (tmp_path / "changed" / "checkpoints").iterdir()) == ["step-2"]  # nothing lost
    run_training(changed, resume=True, allow_config_change=True)
    assert (tmp_path / "changed" / "adapter" / "adapter_model.safetensors").is_file()


def test_reporting_settings_do_not_block_an_exact_resume(tiny_chat_model_dir, tmp_path):
    cfg = _config(tiny_chat_model_dir, tmp_path, out="a", max_steps=4, save_every=2)
    run_training(cfg)
    (tmp_path / "a" / "adapter").rename(tmp_path / "a-adapter")
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-4")
    later = _config(tiny_chat_model_dir, tmp_path, out="a", max_steps=4, save_every=1, log_every=2, eval_every=1,
                    keep_last=3, max_bad_steps=2)
    run_training(later, resume=True)
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "a-adapter" / "adapter_model.safetensors").read_bytes()
