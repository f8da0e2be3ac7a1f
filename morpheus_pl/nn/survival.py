"""Survival losses and risk scores (discrete-time logistic hazard, Cox)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def time_to_bin(time: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Return the bin of each time: the number of cut points at or below it, ``(B,)`` long.

    With ``K - 1`` interior cut points there are ``K`` bins; a time equal to a cut
    point falls in the bin above it.
    """
    return torch.searchsorted(cuts.to(time.dtype).contiguous(), time.contiguous(), right=True)


def logistic_hazard_nll(logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the discrete-time logistic-hazard model, batch mean.

    With hazards ``h_k = sigmoid(logits_k)``, a patient whose time falls in bin ``j``
    contributes ``-sum_{k<j} log(1 - h_k)`` plus ``-log h_j`` after an event or
    ``-log(1 - h_j)`` when censored (censoring counts as surviving bin ``j``).

    Args:
        logits: ``(B, K)`` hazard logits.
        bins: ``(B,)`` long bin of each patient's time.
        event: ``(B,)`` bool, True when the event was observed.
    """
    survive = F.logsigmoid(-logits)
    before = torch.cumsum(survive, dim=1) - survive
    index = bins[:, None]
    in_bin = torch.where(
        event[:, None], F.logsigmoid(logits).gather(1, index), survive.gather(1, index)
    )
    return -(before.gather(1, index) + in_bin).mean()


def survival_function(logits: torch.Tensor) -> torch.Tensor:
    """Return ``S_k = prod_{i<=k} (1 - h_i)``, ``(B, K)``, from hazard logits."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1))


def hazard_risk(logits: torch.Tensor) -> torch.Tensor:
    """Return the risk score ``-sum_k S_k``: higher means earlier expected event, ``(B,)``."""
    return -survival_function(logits).sum(dim=1)


def cox_partial_nll(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), mean over events.

    Each patient's risk set is every patient of the batch whose time is at least its
    own. A batch without events gives a graph-attached zero.

    Args:
        risk: ``(B,)`` log hazard ratios.
        time: ``(B,)`` times.
        event: ``(B,)`` bool event flags.
    """
    at_risk = time[None, :] >= time[:, None]
    log_denominator = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    terms = (risk - log_denominator) * event
    return -terms.sum() / event.sum().clamp_min(1)
