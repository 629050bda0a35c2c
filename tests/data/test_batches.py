"""Batching: length grouping, padding, and packing that never lets examples see each other."""

import torch

from qlorafit.data.batches import batch_order, pack_rows, packed_batch, pad_batch
from qlorafit.data.render import IGNORE, Example
from tests.conftest import build_tiny


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2 :], f"x:{i}"))
    return out


def test_batch_order_covers_everything_once_groups_lengths_and_is_seeded():
    lengths = [int(x) for x in torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0))]
    batches = batch_order(lengths, 8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batch_order(lengths, 8, seed=3) == batches and batch_order(lengths, 8, seed=4) != batches
    padded = sum(8 * max(lengths[i] for i in b) for b in batches)
    rand = [list(range(i, i + 8)) for i in range(0, 1000, 8)]
    assert padded < 0.7 * sum(8 * max(lengths[i] for i in b) for b in rand)


def test_pad_batch():
    batch = pad_batch(_examples([3, 5]), pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0, 3:].tolist() == [IGNORE, IGNORE]


def test_packed_examples_do_not_attend_to_each_other():
    model = build_tiny("llama")
    examples = _examples([5, 7, 4, 9])
    rows = pack_rows(examples, [0, 1, 2, 3], max_length=16)
    assert rows == [[0, 1, 2], [3]]
    batch = packed_batch([[examples[i] for i in row] for row in rows], pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        at = 0
        for e in (examples[0], examples[1], examples[2]):
            alone = model(torch.tensor([e.input_ids])).logits[0]
            assert (packed[0, at : at + len(e)] - alone).abs().max() < 1e-5
            at += len(e)
    assert batch["labels"][1, 9:].eq(IGNORE).all()  # padding is never trained on
