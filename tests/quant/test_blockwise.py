"""4-bit and 8-bit block-wise quantization against bitsandbytes 0.50.2 (the reference), bit for bit."""

import pytest
import torch

from qlorafit.errors import QuantizationError
from qlorafit.quant.blockwise import dequantize_4bit, dequantize_blockwise, quantize_4bit, quantize_blockwise
from tests.conftest import LazyPeer

bnbf = LazyPeer("bitsandbytes.functional")

SHAPES = [(100,), (4095,), (577, 131), (64, 64), (3, 5), (2, 3, 129)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A heavy-tailed mix so blocks differ widely in scale, plus an exact zero block.
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 3
    w.view(-1)[:32] = 0
    return w.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_4bit_matches_bitsandbytes(shape, dtype, quant_type, double_quant):
    for blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        w = _weights(shape, dtype, seed=blocksize)
        ref_packed, ref = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
        packed, state = quantize_4bit(w, quant_type, blocksize, double_quant)
        assert packed.shape == ref_packed.shape and packed.dtype == torch.uint8
        assert torch.equal(packed, ref_packed)
        assert torch.equal(state.absmax, ref.absmax) and state.absmax.dtype == ref.absmax.dtype
        assert torch.equal(state.code, ref.code)
        if double_quant:
            assert torch.equal(state.offset, ref.offset)
            assert torch.equal(state.state2.absmax, ref.state2.absmax)
            assert torch.equal(state.state2.code, ref.state2.code)
        ours = dequantize_4bit(packed, state)
        theirs = bnbf.dequantize_4bit(ref_packed, ref)
        assert ours.dtype == dtype and ours.shape == w.shape
        # bitsandbytes returns 1-D tensors as (1, n); the values are what must agree.
        assert torch.equal(ours, theirs.reshape(ours.shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_4bit_into_other_dtype(dtype):
    w = _weights((96, 64), torch.float32)
    packed, state = quantize_4bit(w)
    full = dequantize_4bit(packed, state)
    assert torch.equal(dequantize_4bit(packed, state, dtype=dtype), full.to(dtype))


def test_4bit_error_is_bounded_by_the_code_spacing():
    w = torch.randn(256, 256)
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=False)
    err = (dequantize_4bit(packed, state) - w).abs().view(-1, 64)
    # The widest NF4 gap is from -1 to -0.6962; half of it times the block scale bounds the error.
    assert (err.max(dim=1).values <= state.absmax * (1 - 0.6961928) / 2 + 1e-6).all()


@pytest.mark.parametrize("n", [256, 1000, 4097, 70000])
@pytest.mark.parametrize("blocksize", [64, 256, 2048, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_blockwise_matches_bitsandbytes(n, blocksize, dtype):
    g = torch.Generator().manual_seed(n + blocksize)
    x = (torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4).to(dtype)
    x[: min(blocksize, n // 2)] = 0
    ref_q, ref = bnbf.quantize_blockwise(x, blocksize=blocksize)
    q, state = quantize_blockwise(x, blocksize=blocksize)
    assert torch.equal(q, ref_q)
    assert torch.equal(state.absmax, ref.absmax)
    assert torch.equal(state.code, ref.code)
    assert torch.equal(dequantize_blockwise(q, state), bnbf.dequantize_blockwise(ref_q, ref))


def test_bad_settings_raise_clear_errors():
    w = torch.randn(64, 64)
    with pytest.raises(QuantizationError, match="unknown 4-bit quant type 'int3'"):
        quantize_4bit(w, "int3")
    with pytest.raises(QuantizationError, match="power of two from 32 to 4096"):
        quantize_4bit(w, "nf4", blocksize=48)
    with pytest.raises(QuantizationError, match="float32, float16 or bfloat16"):
        quantize_4bit(w.to(torch.int32))
    packed, state = quantize_4bit(w)
    with pytest.raises(QuantizationError, match="needs 4096"):
        dequantize_4bit(packed[:100], state)


def test_chunked_quantization_gives_the_same_bytes(monkeypatch):
    import qlorafit.quant.blockwise as blockwise

    monkeypatch.setattr(blockwise, "_QUANT_CHUNK", 4096)  # many chunks, each a whole number of blocks
    for shape, blocksize in [((3, 4097), 64), ((64, 8192), 4096), ((577, 131), 128)]:
        w = _weights(shape, torch.bfloat16)
        ref_packed, ref = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="fp4")
        packed, state = blockwise.quantize_4bit(w, "fp4", blocksize, True)
        assert torch.equal(packed, ref_packed)
        assert torch.equal(state.state2.absmax, ref.state2.absmax) and torch.equal(state.absmax, ref.absmax)
