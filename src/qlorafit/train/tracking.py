"""Experiment tracking: the rows of metrics.jsonl also go to TensorBoard, MLflow or Weights & Biases.

`report_to: [tensorboard, mlflow, wandb]` (default none), as in Hugging Face's Trainer. Each
backend logs the same scalars as `metrics.jsonl`, named as the Trainer names them
(`train/loss`, `train/learning_rate`, `train/grad_norm`, `train/tokens_per_s`, `train/skipped`,
`eval/loss`, `eval/perplexity`, ...) at the optimizer step, and the resolved configuration as
hyper-parameters (dotted keys). Only the process that writes files (rank 0) reports.

- tensorboard: event files in `output_dir/tensorboard` (`tensorboard --logdir output_dir`).
- mlflow: the tracking server of `MLFLOW_TRACKING_URI`, else a local store in `output_dir/mlruns`;
  the experiment `MLFLOW_EXPERIMENT_NAME` (default qlorafit); the run is named after output_dir.
- wandb: the project `WANDB_PROJECT` (default qlorafit), files under `output_dir/wandb`;
  `WANDB_MODE=offline` keeps the run on disk for `wandb sync`.

Each backend is an optional extra (`pip install 'qlorafit[tensorboard]'`); asking for one that is
not installed is an error before anything is loaded.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from ..config import dotted
from ..errors import QlorafitError

BACKENDS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # backend: module it needs
_NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
          "tokens_per_s": "train/tokens_per_s", "elapsed_s": "train/elapsed_s", "epoch": "train/epoch",
          "skipped": "train/skipped", "skipped_total": "train/skipped_total", "eval_loss": "eval/loss",
          "eval_ppl": "eval/perplexity", "eval_tokens": "eval/tokens"}


def check_installed(report_to: list[str]) -> None:
    """Refuse a backend whose package is missing, naming the extra that installs it."""
    for name in report_to:
        if name not in BACKENDS:
            raise QlorafitError(f"report_to: unknown tracker {name!r}; use any of {', '.join(BACKENDS)}")
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise QlorafitError(f"report_to: {name} needs the {BACKENDS[name]} package, which is not installed: "
                                f"pip install 'qlorafit[{name}]' (or remove {name} from report_to)")


def scalars(row: dict) -> dict[str, float]:
    """A metrics row's numbers under the trackers' names (steps excluded; booleans as 0/1)."""
    out = {}
    for key, value in row.items():
        if key in _NAMES and isinstance(value, (int, float)) and (isinstance(value, bool) or math.isfinite(value)):
            out[_NAMES[key]] = float(value)
    return out


def flat_config(tree: dict) -> dict[str, Any]:
    """The configuration as dotted keys with scalar values (lists as text), as trackers take them."""
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in dotted(tree).items()}


class _TensorBoard:
    def __init__(self, output_dir: Path, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        text = "\n".join(f"    {k}: {v}" for k, v in flat_config(config).items())  # markdown code block
        self.writer.add_text("config", text, 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, output_dir: Path, config: dict) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the local store needs no server
            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "qlorafit"))
        self.run = mlflow.start_run(run_name=output_dir.name)
        params = flat_config(config)
        try:
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                mlflow.log_params(dict(list(params.items())[start : start + 100]))
        except Exception:
            mlflow.end_run(status="FAILED")
            raise

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Wandb:
    def __init__(self, output_dir: Path, config: dict) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "qlorafit"), name=output_dir.name,
                              dir=str(output_dir), config=flat_config(config))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_MAKERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}


class Trackers:
    """The trackers `report_to` names, fed with metrics rows (`__call__`) and closed at the end."""

    def __init__(self, report_to: list[str], output_dir: Path, config: dict) -> None:
        check_installed(report_to)
        self.backends = []
        try:
            for name in report_to:
                self.backends.append(_MAKERS[name](output_dir, config))
        except Exception:
            self.close()
            raise

    def __call__(self, row: dict) -> None:
        values = scalars(row)
        if values:
            for backend in self.backends:
                backend.log(int(row["step"]), values)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []
