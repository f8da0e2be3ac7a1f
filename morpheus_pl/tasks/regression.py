"""Regression of a continuous clinical variable: a complete task in one module.

``docs/adding-a-task.md`` walks through this file as the template for new tasks: a
``Targets`` subclass that reads the label column, and a ``DownstreamTask`` subclass
with the head, the loss and the metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError, MetricCollection, PearsonCorrCoef

from data_modules.targets import TargetData, Targets
from morpheus_pl.tasks.base import DownstreamTask

#: Batch key of the regression label.
VALUE = "value"


class RegressionTargets(Targets):
    """A continuous label, standardised with the training split's mean and deviation.

    Args:
        column: Cohort column of the values; patients with a missing or non-numeric
            value are left out.
    """

    def __init__(self, column: str = "age_years") -> None:
        self.column = column

    @property
    def columns(self) -> list[str]:
        return [self.column]

    def read(self, table: pd.DataFrame, patients, source: str) -> TargetData:
        values = pd.to_numeric(table.loc[list(patients), self.column], errors="coerce").to_numpy(float)
        valid = np.isfinite(values)
        # Stratify on quartiles so that folds span the range of the variable.
        quartiles = np.nanquantile(values, [0.25, 0.5, 0.75]) if valid.any() else []
        strata = np.digitize(np.nan_to_num(values), quartiles)
        tensors = {VALUE: torch.as_tensor(np.nan_to_num(values), dtype=torch.float32)}
        return TargetData(tensors, valid, strata, {"strata": "quantile"})

    def info(self, data: TargetData, train_index: np.ndarray, source: str) -> dict[str, Any]:
        train = data.tensors[VALUE][torch.as_tensor(train_index)]
        return {"task": "regression", "mean": float(train.mean()), "std": float(train.std().clamp_min(1e-8))}


class RegressionTask(DownstreamTask):
    """Predict a continuous variable; reports mean absolute error and Pearson r.

    The head predicts the standardised value; metrics are on the original scale.

    Args:
        **kwargs: Arguments of :class:`~morpheus_pl.tasks.base.DownstreamTask`.
    """

    def configure_head(self, width: int, target_info: dict[str, Any]) -> nn.Module:
        return nn.Linear(width, 1)

    def predict_value(self, outputs: torch.Tensor) -> torch.Tensor:
        """Return ``(B,)`` predictions on the original scale."""
        info = self.hparams.target_info
        return outputs[:, 0].float() * info["std"] + info["mean"]

    def compute_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        info = self.hparams.target_info
        target = (batch[VALUE] - info["mean"]) / info["std"]
        return F.mse_loss(outputs[:, 0].float(), target)

    def configure_metrics(self, target_info: dict[str, Any]) -> MetricCollection:
        return MetricCollection({"mae": MeanAbsoluteError(), "pearson": PearsonCorrCoef()})

    def update_metrics(self, metric: MetricCollection, outputs: torch.Tensor, batch: dict) -> None:
        metric.update(self.predict_value(outputs), batch[VALUE])
