"""Survival prediction: discrete-time logistic hazard or Cox partial likelihood."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from morpheus_pl import batch as keys
from morpheus_pl.metrics import ConcordanceIndex
from morpheus_pl.nn.survival import cox_partial_nll, hazard_risk, logistic_hazard_nll, time_to_bin
from morpheus_pl.tasks.base import DownstreamTask


class SurvivalTask(DownstreamTask):
    """Survival head with Harrell's c-index as the evaluation metric.

    With ``loss: logistic_hazard`` the head predicts one hazard logit per time bin.
    The bins' edges are quantiles of the training split's event times (computed by
    ``data_modules.SurvivalTargets``), and the risk is the negative sum of the
    survival function over the bins. With ``loss: cox`` the head predicts one log
    hazard ratio, which is the risk.

    Args:
        loss: ``logistic_hazard`` or ``cox``.
        **kwargs: Arguments of :class:`~morpheus_pl.tasks.base.DownstreamTask`.
    """

    def __init__(self, loss: Literal["logistic_hazard", "cox"] = "logistic_hazard", **kwargs: Any) -> None:
        self.loss_name = loss
        super().__init__(**kwargs)
        cuts = torch.tensor(self.hparams.target_info["time_bins"], dtype=torch.float32)
        self.register_buffer("time_cuts", cuts)

    def configure_head(self, width: int, target_info: dict[str, Any]) -> nn.Module:
        outputs = 1 if self.loss_name == "cox" else len(target_info["time_bins"]) + 1
        return nn.Linear(width, outputs)

    def risk(self, outputs: torch.Tensor) -> torch.Tensor:
        """Return ``(B,)`` risk scores (higher means an earlier expected event)."""
        if self.loss_name == "cox":
            return outputs[:, 0]
        return hazard_risk(outputs.float())

    def compute_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        time, event = batch[keys.TIME], batch[keys.EVENT]
        if self.loss_name == "cox":
            return cox_partial_nll(outputs[:, 0].float(), time, event)
        return logistic_hazard_nll(outputs.float(), time_to_bin(time, self.time_cuts), event)

    def configure_metrics(self, target_info: dict[str, Any]) -> ConcordanceIndex:
        return ConcordanceIndex()

    def update_metrics(self, metric: ConcordanceIndex, outputs: torch.Tensor, batch: dict) -> None:
        metric.update(
            batch[keys.PATIENT_INDEX],
            risk=self.risk(outputs),
            time=batch[keys.TIME],
            event=batch[keys.EVENT],
        )
