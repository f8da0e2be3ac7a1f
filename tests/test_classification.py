"""Tests of the classification metrics and class labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from data_modules import ClassTargets
from morpheus_pl.errors import InputError
from morpheus_pl.metrics import ClassificationScores


def scores_of(probs, labels, num_classes):
    metric = ClassificationScores(num_classes)
    metric.update(torch.arange(len(labels)), probs=torch.as_tensor(probs), label=torch.as_tensor(labels))
    return metric.compute()


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_matches_sklearn(num_classes):
    rng = np.random.default_rng(num_classes)
    labels = rng.integers(0, num_classes, size=200)
    logits = rng.normal(size=(200, num_classes)) + np.eye(num_classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    result = scores_of(probs.astype(np.float32), labels, num_classes)
    if num_classes == 2:
        expected_auc = roc_auc_score(labels, probs[:, 1])
    else:
        expected_auc = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert result["auroc"].item() == pytest.approx(expected_auc, abs=1e-5)
    assert result["balanced_accuracy"].item() == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)), abs=1e-6)


def test_single_class_is_nan_with_warning():
    with pytest.warns(UserWarning, match="single class"):
        result = scores_of(np.full((5, 2), 0.5, dtype=np.float32), [1, 1, 1, 1, 1], 2)
    assert torch.isnan(result["auroc"])
    assert torch.isnan(result["balanced_accuracy"])


def test_absent_class_averages_over_present():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]], dtype=np.float32)
    with pytest.warns(UserWarning, match="only 2 of 3 classes present"):
        result = scores_of(probs, [0, 1, 0, 1], 3)
    assert result["auroc"].item() == pytest.approx(1.0)
    assert result["balanced_accuracy"].item() == pytest.approx(1.0)


def test_bfloat16_scores_are_cast():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=torch.bfloat16)
    metric = ClassificationScores(2)
    metric.update(torch.arange(3), probs=probs, label=torch.tensor([0, 1, 0]))
    assert metric.compute()["auroc"].dtype == torch.float32


def test_class_targets_read_and_unknown_label():
    table = pd.DataFrame({"type": ["b", "a", None, "b"]}, index=list("wxyz"))
    data = ClassTargets("type").read(table, list("wxyz"), "c.csv")
    assert data.meta["classes"] == ["a", "b"]
    assert data.valid.tolist() == [True, True, False, True]
    assert data.tensors["label"].tolist()[:2] == [1, 0]
    with pytest.raises(InputError, match="patient 'w' has 'type' = 'b', which is not one of the configured classes"):
        ClassTargets("type", classes=["a", "c"]).read(table, list("wxyz"), "c.csv")
