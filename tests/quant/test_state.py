"""QuantState serialization: bitsandbytes' keys, both directions."""

import pytest
import torch

from qlorafit.errors import QuantizationError
from qlorafit.quant.blockwise import dequantize_4bit, quantize_4bit
from qlorafit.quant.state import QuantState
from tests.conftest import LazyPeer

bnbf = LazyPeer("bitsandbytes.functional")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_as_dict_matches_bitsandbytes_and_loads_both_ways(quant_type, double_quant, dtype):
    w = torch.randn(130, 70).to(dtype)
    packed, ours = quantize_4bit(w, quant_type, 64, double_quant)
    ref_packed, ref = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    mine, theirs = ours.as_dict(packed=True), ref.as_dict(packed=True)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    # bitsandbytes' dict -> our state -> same values; ours -> bitsandbytes' state -> same values.
    from_theirs = QuantState.from_dict({f"weight.{k}": v for k, v in theirs.items()})
    assert torch.equal(dequantize_4bit(ref_packed, from_theirs), dequantize_4bit(packed, ours))
    their_state = bnbf.QuantState.from_dict(dict(mine), device=torch.device("cpu"))
    assert torch.equal(bnbf.dequantize_4bit(packed, their_state).reshape(w.shape), dequantize_4bit(packed, ours))


def test_unpacked_dict_round_trip():
    packed, state = quantize_4bit(torch.randn(64, 64))
    again = QuantState.from_dict(state.as_dict())
    assert torch.equal(dequantize_4bit(packed, again), dequantize_4bit(packed, state))


def test_corrupt_json_and_missing_keys_raise():
    packed, state = quantize_4bit(torch.randn(64, 64))
    d = state.as_dict(packed=True)
    d["quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(QuantizationError, match="not valid UTF-8 JSON"):
        QuantState.from_dict(d)
    d = state.as_dict(packed=True)
    del d["absmax"]
    with pytest.raises(QuantizationError, match="missing"):
        QuantState.from_dict(d)
