"""Linear4bit: forward/backward through the dequantized weight, nothing full-precision kept."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlorafit.quant.linear4bit import Linear4bit


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_input_grad_equal_dense_linear_on_dequantized_weight(quant_type, bias):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(96, 40, bias=bias), quant_type=quant_type)
    w = layer.dequantize(torch.float32)
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = F.linear(x_ref, w, layer.bias)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert all(not p.requires_grad for p in layer.parameters())


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 12), compute_dtype=torch.float64)
    x = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_nothing_full_precision_saved_for_backward():
    layer = Linear4bit.from_linear(nn.Linear(256, 256))
    x = torch.randn(8, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert not any(t.shape == (256, 256) for t in saved)


def test_compute_dtype_casts_input_and_returns_input_dtype():
    layer = Linear4bit.from_linear(nn.Linear(64, 8), compute_dtype=torch.float64)
    out = layer(torch.randn(2, 64))
    assert out.dtype == torch.float32


def test_state_dict_round_trip_and_bitsandbytes_keys():
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    sd = layer.state_dict()
    assert set(sd) == {
        "weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
    }
    other = Linear4bit.from_linear(nn.Linear(64, 32))
    other.load_state_dict(sd)
    assert torch.equal(other.dequantize(), layer.dequantize())


def test_dtype_cast_of_module_leaves_codes_and_scales_alone():
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    before = layer.dequantize()
    layer.to(torch.float16)
    assert layer.weight.dtype == torch.uint8
    assert torch.equal(layer.dequantize(torch.float32), before)


def test_reused_dequantization_buffer_works_in_and_out_of_inference_mode():
    from qlorafit.quant import dequant_workspace

    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    x = torch.randn(3, 64)
    with dequant_workspace():
        with torch.inference_mode():
            first = layer(x).clone()  # the workspace's buffer is created here, in inference mode
        second = layer(x)  # and must still be writable outside it
    assert torch.equal(first, second)


def test_workspace_owns_the_transient_weights_and_frees_them_on_exit():
    from qlorafit.quant import dequant_workspace

    small, big = Linear4bit.from_linear(nn.Linear(64, 32)), Linear4bit.from_linear(nn.Linear(128, 96))
    outside = [small.dequantize(reuse_buffer=True) for _ in range(2)]
    assert outside[0].data_ptr() != outside[1].data_ptr()  # no hidden global buffer without a workspace
    with dequant_workspace() as ws:
        a = small.dequantize(reuse_buffer=True)
        b = small.dequantize(reuse_buffer=True)
        assert a.data_ptr() == b.data_ptr()  # one buffer reused
        assert torch.equal(b, small.dequantize())  # same values as a fresh tensor
        big.dequantize(reuse_buffer=True)
        assert ws.nbytes == 96 * 128 * 4  # grown to the largest weight, the old buffer dropped
        with dequant_workspace() as inner:
            assert inner is ws  # nested blocks share the outer workspace
        assert ws.nbytes == 96 * 128 * 4
    assert ws.nbytes == 0  # released when the block ends


def test_lookup_tables_are_made_once_per_device():
    from qlorafit.quant.codebooks import pair_table_4bit, quad_table_4bit

    assert quad_table_4bit("nf4", "cpu") is quad_table_4bit("nf4", torch.device("cpu"))
    assert pair_table_4bit("fp4") is pair_table_4bit("fp4", "cpu")
