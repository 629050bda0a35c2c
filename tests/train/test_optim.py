"""8-bit and paged AdamW: close to float32 AdamW, paged identical to in-memory, state 4x smaller."""

import copy

import torch

from qlorafit.train.optim import AdamW, state_bytes
from tests.conftest import LazyPeer

bnb_optim = LazyPeer("bitsandbytes.optim")


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(64, 128, generator=g)
    x = torch.randn(256, 128, generator=g)
    return x, x @ target.t()


def _fit(opt_factory, steps=60, seed=0):
    x, y = _problem(seed)
    w = torch.nn.Parameter(torch.zeros(64, 128))
    opt = opt_factory([w])
    losses = []
    for _ in range(steps):
        loss = ((x @ w.t() - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return w.detach(), losses, opt


def test_32bit_equals_torch_adamw_bit_for_bit_in_memory_and_paged(tmp_path):
    for wd in (0.0, 0.01):
        w_ref, _, ref = _fit(lambda p, wd=wd: torch.optim.AdamW(p, lr=1e-2, weight_decay=wd, foreach=False))
        w_ours, _, _ = _fit(lambda p, wd=wd: AdamW(p, lr=1e-2, weight_decay=wd))
        w_paged, _, _ = _fit(lambda p, wd=wd: AdamW(p, lr=1e-2, weight_decay=wd, paged=tmp_path / f"p{wd}"))
        assert torch.equal(w_ours, w_ref) and torch.equal(w_paged, w_ref), wd
    # a torch.optim.AdamW checkpoint (moments shaped like the parameter) continues here exactly
    x, y = _problem()

    def steps(param, opt, n):
        for _ in range(n):
            ((x @ param.t() - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()

    w = torch.nn.Parameter(torch.zeros(64, 128))
    torch_opt = torch.optim.AdamW([w], lr=1e-2, foreach=False)
    steps(w, torch_opt, 3)
    state, at_3 = copy.deepcopy(torch_opt.state_dict()), w.detach().clone()
    steps(w, torch_opt, 3)
    resumed = torch.nn.Parameter(at_3)
    ours = AdamW([resumed], lr=1e-2)
    ours.load_state_dict(state)
    steps(resumed, ours, 3)
    assert torch.equal(resumed.detach(), w.detach())


def test_8bit_equals_bitsandbytes_adamw8bit_bit_for_bit(tmp_path):
    """A 64x128 weight (8-bit moments) and a 64-element bias (below min_8bit_size: 32-bit moments),
    with weight decay, against bitsandbytes' AdamW8bit on the same gradients."""
    x, y = _problem()

    def fit(make, steps=25):
        w = torch.nn.Parameter(torch.zeros(64, 128))
        b = torch.nn.Parameter(torch.zeros(64))
        opt = make([w, b])
        for _ in range(steps):
            ((x @ w.t() + b - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        return w.detach(), b.detach(), opt

    kw = dict(lr=1e-2, weight_decay=0.01)
    w_ref, b_ref, ref = fit(lambda p: bnb_optim.AdamW8bit(p, min_8bit_size=4096, **kw))
    for paged in (None, tmp_path / "pages"):
        w, b, ours = fit(lambda p, paged=paged: AdamW(p, bits=8, min_8bit_size=4096, paged=paged, **kw))
        assert torch.equal(w, w_ref) and torch.equal(b, b_ref), paged
        (sw, sb), (rw, rb) = ([o.state[p] for p in o.param_groups[0]["params"]] for o in (ours, ref))
        assert torch.equal(sw["exp_avg_codes"], rw["state1"].view(-1)) and torch.equal(sw["exp_avg_absmax"], rw["absmax1"])
        assert torch.equal(sw["exp_avg_sq_codes"], rw["state2"].view(-1))
        assert torch.equal(sb["exp_avg"], rb["state1"].view(-1)) and torch.equal(sb["exp_avg_sq"], rb["state2"].view(-1))


def test_8bit_tracks_32bit_and_stores_a_quarter():
    _, l32, o32 = _fit(lambda p: AdamW(p, lr=1e-2))
    _, l8, o8 = _fit(lambda p: AdamW(p, lr=1e-2, bits=8))
    assert l8[-1] < 0.4 * l8[0]  # it optimizes
    assert max(abs(a - b) / b for a, b in zip(l32, l8, strict=True)) < 0.02  # within 2% of fp32 all along
    assert state_bytes(o8) < 0.3 * state_bytes(o32)


def test_paged_equals_in_memory_and_survives_state_dict_round_trip(tmp_path):
    for bits in (32, 8):
        w_mem, _, _ = _fit(lambda p, b=bits: AdamW(p, lr=1e-2, bits=b), steps=20)
        w_pag, _, opt = _fit(lambda p, b=bits: AdamW(p, lr=1e-2, bits=b, paged=tmp_path / f"pages{b}"), steps=20)
        assert torch.equal(w_mem, w_pag)
        assert any((tmp_path / f"pages{bits}").iterdir())
        saved = opt.state_dict()
        fresh = AdamW([torch.nn.Parameter(w_pag.clone())], lr=1e-2, bits=bits, paged=tmp_path / f"again{bits}")
        fresh.load_state_dict(saved)
        state = next(iter(fresh.state.values()))
        assert all(torch.equal(state[k], v) for k, v in next(iter(opt.state.values())).items())
        opt.close()
        assert not (tmp_path / f"pages{bits}").exists()
