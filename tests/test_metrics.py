"""Tests of the epoch metrics and the pre-training module's evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from morpheus_pl import MaskedOmicsPretraining
from morpheus_pl.metrics import FeaturePearson


def test_feature_pearson_matches_scipy():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(30, 2, 3, generator=gen)
    target = pred * 0.5 + torch.randn(30, 2, 3, generator=gen)
    target[4, 0, 1] = float("nan")
    index = torch.tensor([[0, 1, 2], [3, 4, 4]])  # slot (1, 2) is padding
    valid = torch.tensor([[True, True, True], [True, True, False]])
    scored = torch.rand(30, 2, generator=gen) > 0.3

    metric = FeaturePearson(5)
    # Two updates must equal one update over all samples.
    metric.update(pred[:11], target[:11], index, valid, scored[:11])
    metric.update(pred[11:], target[11:], index, valid, scored[11:])
    r = metric.per_feature()

    expected = []
    for g, s in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        use = scored[:, g] & ~torch.isnan(target[:, g, s])
        expected.append(stats.pearsonr(pred[use, g, s].numpy(), target[use, g, s].numpy())[0])
    np.testing.assert_allclose(r.numpy(), expected, rtol=1e-6)
    assert metric.compute().item() == pytest.approx(float(np.median(expected)))


def test_feature_pearson_undefined_is_nan():
    metric = FeaturePearson(2)
    pred = torch.tensor([[[1.0, 2.0]], [[2.0, 2.0]], [[3.0, 2.0]]])
    target = torch.tensor([[[1.0, 5.0]], [[3.0, 6.0]], [[2.0, 7.0]]])
    metric.update(pred, target, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool), torch.ones(3, 1, dtype=torch.bool))
    r = metric.per_feature()
    assert not torch.isnan(r[0])
    assert torch.isnan(r[1])  # constant prediction
    empty = FeaturePearson(3)
    with pytest.warns(UserWarning, match="before the ``update`` method"):
        assert torch.isnan(empty.compute())


def spec(n_features: int, groups: list[list[int]]) -> dict:
    return {
        "features": [f"f{i}" for i in range(n_features)],
        "groups": groups,
        "group_names": [f"g{i}" for i in range(len(groups))],
        "train_mean": [0.5] * n_features,
    }


def test_eval_masks_are_fixed_across_epochs():
    torch.manual_seed(0)
    module = MaskedOmicsPretraining(
        8, {"rna": spec(6, [[0, 1], [2, 3], [4, 5], [1, 4]])}, width=16, num_prototypes=2,
        heads=2, mlp_dim=16, decoder_width=16, decoder_heads=2, decoder_mlp_dim=16, mask_ratio=0.5,
    ).eval()
    batch = {
        "patches": torch.randn(5, 7, 8),
        "patch_mask": torch.ones(5, 7, dtype=torch.bool),
        "omics": {"rna": torch.randn(5, 6)},
        "omics_present": {"rna": torch.ones(5, dtype=torch.bool)},
    }
    results = []
    for _ in range(2):
        with torch.no_grad():
            module._eval_step(batch, 0, "val")
        metrics = module.eval_metrics["val"]
        results.append((metrics["loss_rna"].compute().item(), metrics["baseline_loss_rna"].compute().item()))
        for metric in metrics.values():
            metric.reset()
    assert results[0] == results[1]


def test_baseline_uses_training_mean():
    module = MaskedOmicsPretraining(
        4, {"rna": spec(2, [[0], [1]])}, width=8, num_prototypes=1, heads=1, mlp_dim=8,
        decoder_width=8, decoder_heads=1, decoder_mlp_dim=8, mask_ratio=1.0,
    ).eval()
    target = torch.tensor([[1.5, -0.5], [0.5, 2.5]])
    batch = {
        "patches": torch.randn(2, 3, 4),
        "patch_mask": torch.ones(2, 3, dtype=torch.bool),
        "omics": {"rna": target},
        "omics_present": {"rna": torch.ones(2, dtype=torch.bool)},
    }
    with torch.no_grad():
        module._eval_step(batch, 0, "val")
    baseline = module.eval_metrics["val"]["baseline_loss_rna"].compute().item()
    assert baseline == pytest.approx((target - 0.5).abs().mean().item())
