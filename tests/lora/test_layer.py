"""LoraLinear on float, Conv1D and 4-bit bases: init, forward, scaling, merge/unmerge."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlorafit.errors import AdapterError
from qlorafit.lora.layer import LoraLinear
from qlorafit.quant.linear4bit import Linear4bit
from tests.conftest import LazyPeer

bnbf = LazyPeer("bitsandbytes.functional")


def _bases():
    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs
    nn.init.normal_(conv.weight)
    return {
        "linear": nn.Linear(40, 24),
        "conv1d": conv,
        "linear4bit": Linear4bit.from_linear(nn.Linear(40, 24)),
    }


def _dense_weight(base):
    if isinstance(base, Conv1D):
        return base.weight.t()
    if isinstance(base, Linear4bit):
        return base.dequantize()
    return base.weight


@pytest.mark.parametrize("kind", ["linear", "conv1d", "linear4bit"])
def test_fresh_adapter_changes_nothing_and_is_float32(kind):
    base = _bases()[kind]
    x = torch.randn(3, 40)
    expected = base(x)
    layer = LoraLinear.from_base(base, r=4, alpha=8)
    assert torch.equal(layer(x), expected)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    assert layer.lora_A.weight.shape == (4, 40) and layer.lora_B.weight.shape == (24, 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(40)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 40
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4


@pytest.mark.parametrize("kind", ["linear", "conv1d", "linear4bit"])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_base_plus_scaled_update(kind, rslora):
    base = _bases()[kind]
    layer = LoraLinear.from_base(base, r=4, alpha=8, rslora=rslora)
    nn.init.normal_(layer.lora_B.weight)
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    assert layer.scaling == scale
    x = torch.randn(2, 3, 40)
    w = _dense_weight(base)
    bias = base.bias
    expected = F.linear(x, w, bias) + scale * (x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(kind):
    base = _bases()[kind]
    layer = LoraLinear.from_base(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 40)
    before = layer(x)
    w0 = _dense_weight(base).detach().clone()
    layer.merge()
    assert layer.merged
    assert torch.allclose(layer(x), before, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(_dense_weight(base), w0, atol=1e-6)
    assert torch.allclose(layer(x), before, atol=1e-5)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_merge_into_4bit_is_bitsandbytes_quantization_of_the_sum(quant_type, double_quant):
    base = Linear4bit.from_linear(_bases()["linear"], quant_type=quant_type, double_quant=double_quant, blocksize=64)
    layer = LoraLinear.from_base(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.01)
    total = layer.merged_weight()  # dequantized base + s * B @ A, float32
    layer.merge()
    codes, state = bnbf.quantize_4bit(total, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    assert torch.equal(base.weight, codes)
    assert torch.equal(base.dequantize(torch.float32), bnbf.dequantize_4bit(codes, state).float())


def test_dropout_is_used_in_training_only():
    layer = LoraLinear.from_base(nn.Linear(40, 24), r=4, alpha=8, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(64, 40)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_bad_rank_or_dropout():
    with pytest.raises(AdapterError, match="positive integer"):
        LoraLinear.from_base(nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(AdapterError, match="dropout"):
        LoraLinear.from_base(nn.Linear(4, 4), r=2, alpha=1, dropout=1.5)


def _reference(layer, x, mask):
    """base(x) + s * B(A(dropout(x))) written with plain autograd ops, the mask given."""
    h = x if mask is None else x * mask / (1 - layer.dropout_p)
    w = _dense_weight(layer.base_layer)
    return F.linear(x, w, layer.base_layer.bias) + layer.scaling * (h @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())


@pytest.mark.parametrize("kind", ["linear", "conv1d", "linear4bit"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_training_op_matches_plain_autograd(kind, dropout):
    base = _bases()[kind]
    for p in base.parameters():
        p.requires_grad_(False)
    layer = LoraLinear.from_base(base, r=4, alpha=8, dropout=dropout).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 40, requires_grad=True)
    g = torch.randn(2, 5, 24)
    out = layer(x)
    mask = layer.masks.mask if dropout else None
    if dropout:
        assert mask.shape == x.shape and 0 < mask.float().mean() < 1
    grads = torch.autograd.grad(out, [x, layer.lora_A.weight, layer.lora_B.weight], g)
    expected = _reference(layer, x, mask)
    expected_grads = torch.autograd.grad(expected, [x, layer.lora_A.weight, layer.lora_B.weight], g)
    assert torch.allclose(out, expected, atol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)


def test_layers_reading_one_input_share_its_dropout_mask():
    from qlorafit.lora.layer import MaskCache

    q, k = (LoraLinear.from_base(nn.Linear(40, 24).requires_grad_(False), r=4, alpha=8, dropout=0.5).train()
            for _ in range(2))
    q.masks = k.masks = MaskCache()  # as add_lora shares one cache among a model's layers
    x = torch.randn(8, 40)
    q(x)
    first = q.masks.mask
    k(x)
    assert k.masks.mask is first  # same input tensor: same mask
    q(x.clone())
    assert q.masks.mask is not first and not torch.equal(q.masks.mask, first)


def test_two_models_never_share_lora_state():
    """Masks and kept tensors belong to each model: another model (a thread, a rank) cannot see them."""
    from qlorafit import add_lora

    models = [add_lora(nn.Sequential(nn.Linear(40, 24), nn.Linear(24, 8)), r=2, alpha=4, dropout=0.5,
                       targets=["0", "1"]).train() for _ in range(2)]
    (a0, a1), (b0, b1) = ([m[0], m[1]] for m in models)
    assert a0.masks is a1.masks and b0.masks is b1.masks and a0.masks is not b0.masks
    x = torch.randn(3, 40)
    models[0](x)
    assert a0.masks.mask is not None and b0.masks.mask is None
