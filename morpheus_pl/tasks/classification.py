"""Binary and multiclass classification of patients."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from morpheus_pl import batch as keys
from morpheus_pl.errors import InputError
from morpheus_pl.metrics import ClassificationScores
from morpheus_pl.tasks.base import DownstreamTask


class ClassificationTask(DownstreamTask):
    """Classification head (one logit per class) trained with cross-entropy.

    Evaluation reports AUROC (macro one-vs-rest) and balanced accuracy over all
    patients of the split.

    Args:
        class_weights: Cross-entropy class weights: None (equal), ``balanced``
            (inverse training-split frequency) or one weight per class.
        **kwargs: Arguments of :class:`~morpheus_pl.tasks.base.DownstreamTask`.
    """

    def __init__(self, class_weights: Literal["balanced"] | list[float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        info = self.hparams.target_info
        n_classes = len(info["classes"])
        if class_weights is None:
            weights = torch.ones(n_classes)
        elif class_weights == "balanced":
            counts = torch.tensor(info["train_counts"], dtype=torch.float32)
            weights = counts.sum() / (n_classes * counts.clamp_min(1))
        else:
            if len(class_weights) != n_classes:
                raise InputError(
                    f"class_weights has {len(class_weights)} values but there are {n_classes} "
                    f"classes {info['classes']}"
                )
            weights = torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights)

    def configure_head(self, width: int, target_info: dict[str, Any]) -> nn.Module:
        return nn.Linear(width, len(target_info["classes"]))

    def compute_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), batch[keys.LABEL], weight=self.class_weights)

    def configure_metrics(self, target_info: dict[str, Any]) -> ClassificationScores:
        return ClassificationScores(len(target_info["classes"]))

    def update_metrics(self, metric: ClassificationScores, outputs: torch.Tensor, batch: dict) -> None:
        metric.update(
            batch[keys.PATIENT_INDEX], probs=outputs.float().softmax(dim=1), label=batch[keys.LABEL]
        )
