"""Metrics that accumulate over an epoch and synchronise across processes."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class FeaturePearson(Metric):
    """Per-feature Pearson r between reconstruction and truth, summarised by the median.

    Sums of ``x``, ``y``, ``x^2``, ``y^2`` and ``xy`` are kept per feature in float64
    and summed across processes, so the result does not depend on how patients are
    split over processes or batches. A feature in several groups contributes one pair
    per group in which it is scored.

    Args:
        n_features: Number of features ``F`` of the modality.
        min_pairs: Features with fewer scored pairs get r = NaN.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, n_features: int, min_pairs: int = 3) -> None:
        super().__init__()
        self.min_pairs = min_pairs
        for name in ("n", "sx", "sy", "sxx", "syy", "sxy"):
            self.add_state(name, torch.zeros(n_features, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        feature_index: torch.Tensor,
        feature_valid: torch.Tensor,
        scored: torch.Tensor,
    ) -> None:
        """Add the scored pairs of a batch.

        Args:
            prediction: ``(B, G, S)`` reconstructions.
            target: ``(B, G, S)`` measured values, NaN if missing.
            feature_index: ``(G, S)`` feature index of each slot.
            feature_valid: ``(G, S)`` bool, False for padding slots.
            scored: ``(B, G)`` bool, the groups to score.
        """
        use = scored[..., None] & feature_valid & ~torch.isnan(target)
        x = prediction.detach().to(torch.float64)[use]
        y = target.to(torch.float64)[use]
        index = feature_index.expand_as(use)[use]
        for name, value in (
            ("n", torch.ones_like(x)),
            ("sx", x),
            ("sy", y),
            ("sxx", x * x),
            ("syy", y * y),
            ("sxy", x * y),
        ):
            getattr(self, name).index_add_(0, index, value)

    def per_feature(self) -> torch.Tensor:
        """Return r per feature, ``(F,)``; NaN where undefined."""
        n = self.n
        cov = self.sxy - self.sx * self.sy / n.clamp_min(1)
        var_x = self.sxx - self.sx**2 / n.clamp_min(1)
        var_y = self.syy - self.sy**2 / n.clamp_min(1)
        denom = (var_x * var_y).sqrt()
        ok = (n >= self.min_pairs) & (var_x > 1e-12) & (var_y > 1e-12)
        return torch.where(ok, cov / denom.clamp_min(1e-300), torch.full_like(n, float("nan")))

    def compute(self) -> torch.Tensor:
        """Return the median r over features where it is defined (NaN if none)."""
        r = self.per_feature()
        r = r[~torch.isnan(r)]
        if r.numel() == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.n.device)
        return r.median()
