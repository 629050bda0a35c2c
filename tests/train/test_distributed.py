"""Training on 2 and 3 processes (gloo on this CPU, a file store, one thread per rank) gives the
single-process adapter bit for bit; resumes cross world sizes; faults on one rank reach all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qlorafit.train.distributed import Local, dropout_seed
from tests.conftest import write_chat_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _tree(model_dir: Path, tmp_path: Path, out: str, **train) -> dict:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_chat_jsonl(data, 24)
        write_chat_jsonl(tmp_path / "eval.jsonl", 6, seed=1)
    return {
        "model": str(model_dir),
        "quant": {"type": "nf4"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(data), "eval": str(tmp_path / "eval.jsonl"), "max_length": 64},
        # 24 examples / batch 2 = 12 micro-batches = 3 steps an epoch: step 4 starts the second epoch
        "train": {"batch_size": 2, "grad_accum": 4, "max_steps": 4, "lr": 5e-3, "seed": 0, "save_every": 2,
                  "keep_last": 5, "eval_every": 2, "grad_checkpointing": "full", **train},
        "output_dir": str(tmp_path / out),
    }


def _start(tmp_path: Path, tree: dict, world: int, **spec) -> list[subprocess.Popen]:
    folder = Path(tree["output_dir"]).with_suffix(".spec")
    folder.mkdir(exist_ok=True)
    store = folder / f"store-{time.monotonic_ns()}"
    path = folder / "spec.json"
    path.write_text(json.dumps({"config": tree, "world": world, "store": str(store), "grad_accum": tree["train"]["grad_accum"],
                                "marker": str(folder / "marker"), **spec}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-m", "tests.train.dist_worker", str(path), str(rank)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(world)]


def _finish(procs: list[subprocess.Popen], limit: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=limit)
        out.append((p.returncode, err))
    return out


def _run(tmp_path: Path, tree: dict, world: int, **spec) -> Path:
    results = _finish(_start(tmp_path, tree, world, **spec))
    assert all(rc == 0 for rc, _ in results), "\n".join(err[-3000:] for _, err in results)
    return Path(tree["output_dir"])


def _adapter(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_chat_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(the run's config folder, one process's run)."""
    tmp = tmp_path_factory.mktemp("dist")
    return tmp, _run(tmp, _tree(tiny_chat_model_dir, tmp, "one"), 1)


def test_two_and_three_ranks_give_the_single_process_adapter_bit_for_bit(reference, tiny_chat_model_dir):
    tmp, one = reference
    two = _run(tmp, _tree(tiny_chat_model_dir, tmp, "two"), 2)
    three = _run(tmp, _tree(tiny_chat_model_dir, tmp, "three"), 3)  # rounds of 3: the last has one micro-batch
    assert _adapter(two) == _adapter(one)
    assert _adapter(three) == _adapter(one)
    train_rows = [[r for r in _rows(out) if "loss" in r] for out in (one, two, three)]
    assert [r["step"] for r in train_rows[0]] == [1, 2, 3, 4]
    assert [r["loss"] for r in train_rows[1]] == [r["loss"] for r in train_rows[0]] == [r["loss"] for r in train_rows[2]]
    evals = [[r["eval_loss"] for r in _rows(out) if "eval_loss" in r] for out in (one, two, three)]
    assert len(evals[0]) == 2
    for other in evals[1:]:  # the ranks' eval sums are added in another order: equal to rounding
        assert other == pytest.approx(evals[0], rel=1e-6)
    # checkpoints are the same files too (adapter, optimizer state, position), written once
    for out in (two, three):
        for step in (2, 4):
            a, b = (o / "checkpoints" / f"step-{step}" / "adapter_model.safetensors" for o in (one, out))
            assert a.read_bytes() == b.read_bytes()
    assert not list((two / "checkpoints").glob(".step-*"))
    local, total = json.loads((two.with_suffix(".spec") / "shards-1.json").read_text())
    assert local == total > 0  # data parallel: every rank holds the whole base


def _cut(run: Path, to: Path) -> Path:
    """A copy of a finished run as it was when killed after its step-2 checkpoint."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / "step-4")
    shutil.rmtree(to / "adapter")
    return to


def test_resume_across_world_sizes_ends_with_the_same_adapter(reference, tiny_chat_model_dir):
    tmp, one = reference
    two = _run(tmp, _tree(tiny_chat_model_dir, tmp, "two-for-resume"), 2)
    for source, name, world in ((one, "one-to-two", 2), (two, "two-to-one", 1), (two, "two-to-three", 3)):
        cut = _cut(source, tmp / name)
        _run(tmp, _tree(tiny_chat_model_dir, tmp, name), world, resume=True)
        assert _adapter(cut) == _adapter(one), name
        assert [r["step"] for r in _rows(cut) if "loss" in r] == [1, 2, 3, 4]


def test_paged_8bit_optimizer_on_two_ranks_equals_one_process(tmp_path, tiny_chat_model_dir):
    one = _run(tmp_path, _tree(tiny_chat_model_dir, tmp_path, "one", optimizer="paged_adamw8bit", max_steps=2), 1)
    two = _run(tmp_path, _tree(tiny_chat_model_dir, tmp_path, "two", optimizer="paged_adamw8bit", max_steps=2), 2)
    assert _adapter(two) == _adapter(one)
    assert not (two / "optimizer-pages").exists()


def test_nan_on_one_rank_skips_the_step_on_every_rank(reference, tiny_chat_model_dir):
    tmp, one = reference
    # rank 1 alone sees a NaN loss at step 2: both ranks skip it (the run ends with the ranks'
    # adapters checked equal), the same as one process that sees the NaN at step 2
    two = _run(tmp, _tree(tiny_chat_model_dir, tmp, "nan-two"), 2, nan_at={"1": 2})
    single = _run(tmp, _tree(tiny_chat_model_dir, tmp, "nan-one"), 1, nan_at={"0": 2})
    skipped = [r["step"] for r in _rows(two) if r.get("skipped")]
    assert skipped == [2]
    assert _adapter(two) == _adapter(single) != _adapter(one)


def test_killed_rank_stops_the_others_and_a_fresh_launch_resumes(reference, tiny_chat_model_dir):
    tmp, one = reference
    tree = _tree(tiny_chat_model_dir, tmp, "killed")
    procs = _start(tmp, tree, 2, hang_at={"1": 3}, timeout=20)
    marker = Path(tree["output_dir"]).with_suffix(".spec") / "marker"
    deadline = time.monotonic() + 240
    while not marker.exists():  # rank 1 is inside step 3's forward
        assert time.monotonic() < deadline and procs[1].poll() is None, procs[1].communicate()[1][-3000:]
        time.sleep(0.2)
    killed_at = time.monotonic()
    procs[1].send_signal(signal.SIGKILL)
    (rc0, err0), (rc1, _) = _finish(procs, limit=60)
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0 and "another rank failed or stopped answering" in err0, err0[-3000:]
    assert time.monotonic() - killed_at < 50  # the 20 s timeout, and start-up slack
    out = Path(tree["output_dir"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    _run(tmp, tree, 2, resume=True)
    assert _adapter(out) == _adapter(one)


def test_dropout_seeds_depend_on_seed_step_and_micro_batch_only():
    seeds = {dropout_seed(s, t, j) for s in (0, 1) for t in (0, 1) for j in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert dropout_seed(3, 5, 2) == dropout_seed(3, 5, 2)


def test_local_world_runs_every_micro_batch_in_order():
    world = Local()
    assert list(world.rounds(3)) == [(0, True), (1, True), (2, True)]
    assert world.shard([1, 2, 3]) == [(1, True), (2, True), (3, True)]
    assert world.max(15) == 15 and world.sum([1.5, 2.0]) == [1.5, 2.0]
    assert world.on_main(lambda: 7) == 7
    world.check_same([("w", torch.ones(2))], "weights")  # one process agrees with itself


def test_fsdp_shards_the_4bit_codes_and_trains_the_single_process_adapter(reference, tiny_chat_model_dir):
    tmp, one = reference
    two = _run(tmp, _tree(tiny_chat_model_dir, tmp, "fsdp", distributed="fsdp"), 2)
    # 3 ranks, 4 micro-batches a step and 3 eval batches: ranks without a micro-batch of their own
    # in a round run one anyway (dropped) so that every rank joins every gather of the codes
    three = _run(tmp, _tree(tiny_chat_model_dir, tmp, "fsdp3", distributed="fsdp"), 3)
    assert _adapter(two) == _adapter(one) == _adapter(three)
    for step in (2, 4):
        a, b = (o / "checkpoints" / f"step-{step}" / "state.pt" for o in (one, two))
        assert torch.load(a, weights_only=True)["optimizer"]["state"].keys() == \
            torch.load(b, weights_only=True)["optimizer"]["state"].keys()
    evals = [[r["eval_loss"] for r in _rows(out) if "eval_loss" in r] for out in (one, two)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-6)
    spec = two.with_suffix(".spec")
    for rank in (0, 1):
        local, total = json.loads((spec / f"shards-{rank}.json").read_text())
        assert total / 2 <= local <= total / 2 + 64 * 4  # half of every layer's codes, up to FSDP's padding
