"""The memory planner: exact parameter accounting, the QLoRA paper's sizes, the CLI, checkpointing auto."""

import pytest
import torch
from transformers import AutoConfig

import qlorafit
from qlorafit.cli import main
from qlorafit.errors import QlorafitError
from qlorafit.plan import GiB, parse_device, plan, shape_from_config, shape_from_params
from qlorafit.quant.linear4bit import Linear4bit
from qlorafit.train.run import use_grad_checkpointing
from tests.train.test_run import _config


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_weights_and_adapter_bytes_match_a_loaded_model(tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    shape = shape_from_config(AutoConfig.from_pretrained(folder))
    model, _ = qlorafit.load_model(folder, quant="nf4")
    qlorafit.add_lora(model, r=8, alpha=16)
    trainable, total = qlorafit.parameter_counts(model)
    assert shape.params == total - trainable
    p = plan(shape, method="qlora", rank=8, batch=1, seq=8, available=GiB)
    assert p.rows["LoRA weights"] == trainable * 4 == p.rows["gradients"]
    assert p.rows["optimizer state"] == trainable * 8
    held = sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype == torch.uint8)
    held += sum(m.quant_state.nbytes() for m in model.modules() if isinstance(m, Linear4bit))
    held += sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    assert abs(p.rows["frozen weights"] - held) / held < 0.02
    assert plan(shape, method="lora", rank=8, batch=1, seq=8).rows["frozen weights"] == (total - trainable) * 4


def test_components_move_the_way_the_settings_say(tiny_model_dir):
    shape = shape_from_config(AutoConfig.from_pretrained(tiny_model_dir("llama")))
    base = plan(shape, batch=4, seq=256, available=GiB)
    assert plan(shape, batch=8, seq=256).rows["activations"] == 2 * base.rows["activations"]
    deep = shape_from_params(1e9)  # 16 layers: checkpointing keeps layer inputs plus one layer
    assert plan(deep, grad_checkpointing=True).rows["activations"] < plan(deep).rows["activations"] / 4
    eight = plan(shape, optimizer="adamw8bit")
    assert eight.rows["optimizer state"] < base.rows["optimizer state"] / 3
    paged = plan(shape, optimizer="paged_adamw")
    assert "optimizer state" not in paged.rows and paged.pageable == base.rows["optimizer state"]
    assert plan(shape, method="qlora").rows["frozen weights"] < plan(shape, method="lora").rows["frozen weights"]


def test_llama_sizes_against_the_qlora_paper():
    # 4-bit Llama 7B/13B/33B/65B: about 5/10/21/41 GB; a 65B QLoRA fine-tune fits a 48 GB GPU.
    for n, paper_gb in ((6.7e9, 5), (13e9, 10), (32.5e9, 21), (65.2e9, 41)):
        shape = shape_from_params(n)
        assert abs(shape.params - n) / n < 0.05
        weights = plan(shape, device="cuda:80GB").rows["frozen weights"] / 1e9
        assert 0.7 * paper_gb < weights < 1.05 * paper_gb, (n, weights)
    big = dict(method="qlora", batch=1, seq=512, rank=64, optimizer="paged_adamw", grad_checkpointing=True)
    assert plan(shape_from_params(65.2e9), device="cuda:48GB", **big).fits
    assert not plan(shape_from_params(65.2e9), device="cuda:24GB", **big).fits
    assert not plan(shape_from_params(65.2e9), method="lora", device="cuda:80GB").fits


def test_cli_prints_the_table_and_refuses_bad_input(capsys):
    assert main(["plan", "--params", "7B", "--device", "cuda:24GB", "--grad-checkpointing"]) == 0
    out = capsys.readouterr().out
    for word in ("frozen weights", "LoRA weights", "optimizer state", "activations", "total", "fits"):
        assert word in out
    assert main(["plan", "--params", "7B", "--device", "cuda:4GB"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", "--params", "seven", "--device", "cpu:8GB"]) == 2
    assert "--params 'seven'" in capsys.readouterr().err
    with pytest.raises(QlorafitError, match="cuda:24GB"):
        parse_device("tpu")
    with pytest.raises(QlorafitError, match="memory size"):
        parse_device("cuda:lots")
    assert parse_device("cpu:1.5GB") == ("cpu", int(1.5 * GiB))


def test_grad_checkpointing_auto_follows_the_planner(tiny_chat_model_dir, tmp_path, monkeypatch):
    import qlorafit.train.run as run_module

    cfg = _config(tiny_chat_model_dir, tmp_path)
    model, _ = qlorafit.load_model(tiny_chat_model_dir)
    assert cfg.train.grad_checkpointing == "auto"
    monkeypatch.setattr(run_module, "device_memory", lambda kind: 64 * GiB)
    monkeypatch.setattr(run_module, "rss_bytes", lambda: 0)
    assert use_grad_checkpointing(cfg, model) == "off"
    monkeypatch.setattr(run_module, "device_memory", lambda kind: 1)
    assert use_grad_checkpointing(cfg, model) == "full"
    # between the two: fits with selective checkpointing, not without checkpointing
    monkeypatch.setattr(run_module, "plan", lambda *a, grad_checkpointing, available, **k: plan(
        *a, grad_checkpointing=grad_checkpointing, available=available if grad_checkpointing else 1, **k))
    monkeypatch.setattr(run_module, "device_memory", lambda kind: 64 * GiB)
    assert use_grad_checkpointing(cfg, model) == "selective"
    cfg.train.grad_checkpointing = "selective"
    assert use_grad_checkpointing(cfg, model) == "selective"
    cfg.train.grad_checkpointing = False
    assert use_grad_checkpointing(cfg, model) == "off"
    cfg.train.grad_checkpointing = True
    assert use_grad_checkpointing(cfg, model) == "full"


def test_selective_checkpointing_plans_between_full_and_none():
    shape = shape_from_params(1.1e9)
    sizes = {m: plan(shape, batch=4, seq=512, grad_checkpointing=m).rows["activations"] for m in (False, "selective", True)}
    assert sizes[True] < sizes["selective"] < sizes[False]


def test_devices_and_strategies_plan_per_device():
    shape = shape_from_params(65.2e9)
    big = dict(batch=1, seq=512, rank=16, optimizer="paged_adamw", grad_checkpointing=True)
    one = plan(shape, device="cuda:48GB", **big)
    ddp = plan(shape, device="cuda:24GB", devices=2, strategy="ddp", **big)
    fsdp = plan(shape, device="cuda:24GB", devices=2, strategy="fsdp", **big)
    assert one.fits and not ddp.fits and fsdp.fits  # the QLoRA paper's 65B: one 48 GB GPU, or two 24 GB with FSDP
    assert ddp.rows == one.rows  # data parallel: each device holds everything
    codes = shape.linear_params // 2
    assert fsdp.rows["4-bit codes (shard)"] == codes // 2
    assert fsdp.rows["frozen weights"] + codes == one.rows["frozen weights"]  # scales, embeddings, norms stay whole
    assert 0 < fsdp.rows["gathered layers"] < 0.05 * codes
    assert "2 devices, fsdp: memory per device" in fsdp.table()
    # processes on one CPU share its memory
    assert plan(shape, device="cpu:64GB", devices=4).available == 16 * GiB
    with pytest.raises(QlorafitError, match="method qlora"):
        plan(shape, method="lora", devices=2, strategy="fsdp")
    with pytest.raises(QlorafitError, match="unknown strategy"):
        plan(shape, devices=2, strategy="zero3")
