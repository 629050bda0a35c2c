"""report_to: the metrics of a run read back with each tracker's own reader (TensorBoard event files,
MLflow's local store, W&B's offline run log)."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from qlorafit.config import build_config
from qlorafit.errors import QlorafitError
from qlorafit.train.run import run_training
from tests.conftest import write_chat_jsonl


def _config(model_dir, tmp_path, report_to):
    write_chat_jsonl(tmp_path / "train.jsonl", 12)
    write_chat_jsonl(tmp_path / "eval.jsonl", 4, seed=1)
    return build_config({
        "model": str(model_dir), "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 64},
        "train": {"batch_size": 4, "max_steps": 3, "lr": 5e-3}, "output_dir": str(tmp_path / "run"),
        "report_to": report_to,
    })


def _wandb_history(path) -> list[dict]:
    """The history records of a W&B run log (`run-*.wandb`): W&B's LevelDB-style record log of
    `wandb_internal_pb2.Record` protobufs, read with W&B's own message classes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_every_tracker_gets_the_metrics_and_the_config(tiny_chat_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_training(_config(tiny_chat_model_dir, tmp_path, ["tensorboard", "mlflow", "wandb"]))
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "loss" in r}
    final_eval = [r for r in rows if "eval_loss" in r][-1]
    assert sorted(train) == [1, 2, 3]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2, 3]
    assert [s.value for s in events.Scalars("train/loss")] == pytest.approx(
        [train[k]["loss"] for k in (1, 2, 3)], rel=1e-6)  # event files store float32
    assert [s.step for s in events.Scalars("train/grad_norm")] == [1, 2, 3]
    assert events.Scalars("eval/loss")[-1].value == pytest.approx(final_eval["eval_loss"], rel=1e-6)
    (text,) = events.Tensors("config/text_summary")
    assert b"train.lr: 0.005" in text.tensor_proto.string_val[0]

    from mlflow.tracking import MlflowClient

    client = MlflowClient((out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("qlorafit").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == \
        [(k, train[k]["loss"]) for k in (1, 2, 3)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/learning_rate")] == \
        [train[k]["lr"] for k in (1, 2, 3)]
    assert run.data.params["train.lr"] == "0.005" and run.data.params["lora.r"] == "4"
    assert run.info.run_name == "run"

    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = _wandb_history(log)
    losses = {int(r["_step"]): r["train/loss"] for r in history if "train/loss" in r}
    assert losses == {k: train[k]["loss"] for k in (1, 2, 3)}
    assert [r["eval/loss"] for r in history if "eval/loss" in r][-1] == final_eval["eval_loss"]


def test_a_tracker_that_is_not_installed_is_refused_before_loading(tiny_chat_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(QlorafitError, match=r"report_to: wandb needs the wandb package.*pip install 'qlorafit\[wandb\]'"):
        run_training(_config(tiny_chat_model_dir, tmp_path, ["wandb"]))
    assert not (tmp_path / "run").exists()
