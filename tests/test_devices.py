"""Every device-dependent path, on every device present, against the CPU's results.

The `device` argument runs over the devices this machine has (the CPU always, CUDA when
available; `QLORAFIT_TEST_DEVICES=cuda` picks some, as `make gpu-check` does). Formats must
be identical on every device (the 4-bit codes, the 8-bit states); arithmetic may differ in
summation order only, so float results get a stated tolerance. TF32 stays off on CUDA, so the
tolerance is that of float32 matmuls.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlorafit import add_lora, load_model
from qlorafit.generate import greedy_batch
from qlorafit.quant import Linear4bit, dequantize_4bit, quantize_4bit, quantize_blockwise
from qlorafit.train.loop import enable_grad_checkpointing, train_step
from qlorafit.train.optim import AdamW

from .conftest import token_batch

pytestmark = pytest.mark.device
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _exact_float32():
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = allow


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_codes_and_values_are_the_same_on_every_device(device, quant_type, double_quant):
    w = torch.randn(96, 130) * 0.05
    packed_cpu, state_cpu = quantize_4bit(w, quant_type, 64, double_quant)
    packed, state = quantize_4bit(w.to(device), quant_type, 64, double_quant)
    assert packed.device.type == torch.device(device).type
    assert torch.equal(packed.cpu(), packed_cpu)
    assert torch.equal(dequantize_4bit(packed, state).cpu(), dequantize_4bit(packed_cpu, state_cpu))


def test_8bit_blockwise_codes_are_the_same_on_every_device(device):
    x = torch.randn(5000)
    q_cpu, s_cpu = quantize_blockwise(x)
    q, s = quantize_blockwise(x.to(device))
    assert torch.equal(q.cpu(), q_cpu)
    assert torch.equal(s.absmax.cpu(), s_cpu.absmax)


def test_linear4bit_forward_and_backward_match_the_cpu(device):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 48))
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).square().sum().backward()
    moved = layer.to(device)
    xd = x.detach().to(device).requires_grad_()
    out = moved(xd)
    out.square().sum().backward()
    assert out.device.type == torch.device(device).type
    torch.testing.assert_close(xd.grad.cpu(), x.grad, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("checkpointing", ["off", "full", "selective"])
@pytest.mark.parametrize("bits", [32, 8])
def test_qlora_training_steps_match_the_cpu(device, tiny_model_dir, checkpointing, bits):
    def run(dev: str, init: dict[str, torch.Tensor] | None) -> tuple[list[float], dict, dict]:
        model, _ = load_model(tiny_model_dir("llama"), quant="nf4", compute_dtype="float32", device=dev)
        torch.manual_seed(0)
        add_lora(model, r=4, alpha=8, dropout=0.0)  # dropout masks come from each device's own generator
        lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
        start = {n: p.detach().cpu().clone() for n, p in lora.items()}
        if init is not None:  # the CPU run's initial LoRA weights, not this device's random draw
            with torch.no_grad():
                for n, p in lora.items():
                    p.copy_(init[n])
        if checkpointing != "off":
            enable_grad_checkpointing(model, selective=checkpointing == "selective")
        model.train()
        opt = AdamW(list(lora.values()), lr=1e-2, bits=bits)
        ids = token_batch(shape=(2, 12)).to(dev)
        losses = [train_step(model, opt, [{"input_ids": ids, "labels": ids}], 1.0)[0] for _ in range(3)]
        return losses, {n: p.detach().cpu() for n, p in lora.items()}, start

    losses_cpu, lora_cpu, init = run("cpu", None)
    losses, lora, _ = run(device, init)
    assert losses[-1] < losses[0]  # it trains
    torch.testing.assert_close(losses, losses_cpu, atol=ATOL, rtol=1e-4)
    for name, value in lora_cpu.items():
        torch.testing.assert_close(lora[name], value, atol=1e-3, rtol=1e-3, msg=name)


def test_paged_optimizer_gives_the_same_step_on_every_device(device, tmp_path):
    def run(dev: str, paged) -> torch.Tensor:
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(300, 40, device=dev))
        opt = AdamW([p], lr=1e-2, bits=8, paged=paged)
        for i in range(3):
            p.grad = torch.randn(300, 40, generator=torch.Generator().manual_seed(i)).to(dev)
            opt.step()
        opt.close()
        return p.detach().cpu()

    torch.testing.assert_close(run(device, tmp_path / "pages"), run("cpu", None), atol=1e-6, rtol=1e-5)


def test_greedy_generation_gives_the_same_tokens_on_every_device(device, tiny_model_dir):
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11], [1]]
    answers = {}
    for dev in ("cpu", device):
        model, _ = load_model(tiny_model_dir("llama"), quant="nf4", compute_dtype="float32", device=dev)
        answers[dev] = greedy_batch(model, prompts, max_new_tokens=6, eos_token_ids=[], batch_size=2)
    assert answers[device] == answers["cpu"]
    assert all(len(a) == 6 for a in answers["cpu"])
