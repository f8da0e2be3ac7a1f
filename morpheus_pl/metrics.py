"""Metrics that accumulate over an epoch and synchronise across processes."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
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


def harrell_c_index(
    risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, chunk: int = 4096
) -> tuple[float, int]:
    """Harrell's concordance index of risk scores (higher risk, earlier event).

    A pair is comparable when the patient with the shorter time had the event, and
    when the times tie, one had the event and the other was censored (the event
    counts as earlier). Two tied events are not comparable. A comparable pair is
    concordant when the earlier patient has the higher risk; tied risks count 1/2.

    Returns:
        The index (NaN without comparable pairs) and the number of comparable pairs.
    """
    risk, time, event = risk.double(), time.double(), event.bool()
    concordant = torch.zeros((), dtype=torch.float64, device=risk.device)
    comparable = torch.zeros((), dtype=torch.float64, device=risk.device)
    for start in range(0, len(risk), chunk):
        stop = start + chunk
        t_i, r_i, e_i = time[start:stop, None], risk[start:stop, None], event[start:stop, None]
        earlier = (t_i < time[None, :]) | ((t_i == time[None, :]) & ~event[None, :])
        pairs = e_i & earlier
        comparable += pairs.sum()
        concordant += ((r_i > risk[None, :]) & pairs).sum() + 0.5 * ((r_i == risk[None, :]) & pairs).sum()
    n = int(comparable.item())
    return (float(concordant / comparable) if n else float("nan")), n


class PatientMetric(Metric):
    """Collects per-patient outputs across batches and processes, each patient once.

    A distributed sampler pads the last batch with repeated patients; the states keep
    each output's patient position so that ``compute`` can drop the repeats.
    """

    full_state_update = False

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        self.add_state("index", default=[], dist_reduce_fx="cat")
        for name in names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        """Add a batch: ``index`` is ``(B,)`` patient positions, values are ``(B, ...)``."""
        self.index.append(index.detach())
        for name in self.names:
            getattr(self, name).append(values[name].detach().float())

    def gathered(self) -> dict[str, torch.Tensor]:
        """Return all collected values with each patient once, ordered by position."""
        from torchmetrics.utilities import dim_zero_cat

        index = dim_zero_cat(self.index)
        order = torch.argsort(index, stable=True)
        keep = torch.ones_like(order, dtype=torch.bool)
        keep[1:] = index[order][1:] != index[order][:-1]
        chosen = order[keep]
        return {"index": index[chosen], **{n: dim_zero_cat(getattr(self, n))[chosen] for n in self.names}}


class ConcordanceIndex(PatientMetric):
    """Harrell's c-index over all patients of an epoch; NaN with a warning without pairs."""

    higher_is_better = True

    def __init__(self) -> None:
        super().__init__(("risk", "time", "event"))

    def compute(self) -> dict[str, torch.Tensor]:
        values = self.gathered()
        c_index, pairs = harrell_c_index(values["risk"], values["time"], values["event"])
        if pairs == 0:
            rank_zero_warn(
                f"c-index is NaN: no comparable pair among {len(values['index'])} patients "
                f"({int(values['event'].sum().item())} event(s))"
            )
        return {"c_index": torch.tensor(c_index, dtype=torch.float32)}


class ClassificationScores(PatientMetric):
    """AUROC (macro one-vs-rest) and balanced accuracy over the patients of an epoch.

    Scores are cast to float32 before torchmetrics computes them. With fewer than two
    classes present, both are NaN with a warning. With some classes absent, AUROC and
    balanced accuracy average over the classes present, with a warning.

    Args:
        num_classes: Number of classes ``C``.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__(("probs", "label"))
        self.num_classes = num_classes

    def compute(self) -> dict[str, torch.Tensor]:
        from torchmetrics.functional.classification import binary_auroc, multiclass_recall

        values = self.gathered()
        probs = values["probs"].float()
        label = values["label"].long()
        present = torch.unique(label)
        nan = torch.tensor(float("nan"))
        if len(present) < 2:
            rank_zero_warn(
                f"AUROC and balanced accuracy are NaN: {len(label)} patients of a single class"
            )
            return {"auroc": nan, "balanced_accuracy": nan}
        if len(present) < self.num_classes:
            rank_zero_warn(
                f"only {len(present)} of {self.num_classes} classes present; AUROC and balanced "
                "accuracy average over the classes present"
            )
        if self.num_classes == 2:
            auroc = binary_auroc(probs[:, 1], label)
        else:
            auroc = torch.stack([binary_auroc(probs[:, c], (label == c).long()) for c in present]).mean()
        recall = multiclass_recall(
            probs.argmax(dim=1), label, num_classes=self.num_classes, average="none"
        )
        return {"auroc": auroc.float().cpu(), "balanced_accuracy": recall[present].mean().float().cpu()}
