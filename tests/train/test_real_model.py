"""A short QLoRA run on the real SmolLM2-135M-Instruct lowers the held-out loss."""

import pytest
import torch

import qlorafit
from qlorafit.config import TrainConfig
from qlorafit.data.dataset import load_dataset
from qlorafit.demo import write_demo_data
from qlorafit.evaluate import eval_loss
from qlorafit.train.loop import Run, train


@pytest.mark.real_model
def test_short_qlora_run_lowers_held_out_loss(smollm2_path, tmp_path):
    train_file, eval_file = write_demo_data(tmp_path / "data", n_train=24, n_eval=8)
    model, tok = qlorafit.load_model(smollm2_path, quant="nf4")
    train_data = load_dataset(train_file, tok, max_length=160)
    eval_data = load_dataset(eval_file, tok, max_length=160)
    before = eval_loss(model, eval_data.examples, batch_size=8, pad_id=tok.pad_token_id)["loss"]
    torch.manual_seed(0)
    qlorafit.add_lora(model, r=8, alpha=16, dropout=0.05)
    cfg = TrainConfig(max_steps=3, batch_size=8, lr=2e-3, warmup_steps=1)
    run = Run(tmp_path / "run", tok.pad_token_id, 160)
    run.output_dir.mkdir()
    result = train(model, train_data, eval_data, cfg, run)
    assert result["eval_loss"] < 0.5 * before
    assert (run.output_dir / "checkpoints" / "step-3" / "adapter_model.safetensors").is_file()
