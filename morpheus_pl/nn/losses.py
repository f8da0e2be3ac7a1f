"""Masked reconstruction objective."""

from __future__ import annotations

import torch


def group_l1(
    prediction: torch.Tensor, target: torch.Tensor, feature_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean absolute error per group over the group's measured features.

    Args:
        prediction: ``(B, G, S)`` reconstructed values (``S`` the largest group size).
        target: ``(B, G, S)`` measured values; NaN marks a missing value.
        feature_valid: ``(G, S)`` bool, False for padding slots.

    Returns:
        ``(B, G)`` per-group error and ``(B, G)`` count of measured features used.
    """
    valid = feature_valid & ~torch.isnan(target)
    error = (prediction - torch.nan_to_num(target)).abs() * valid
    count = valid.sum(dim=-1)
    return error.sum(dim=-1) / count.clamp_min(1), count


def masked_group_l1(
    prediction: torch.Tensor,
    target: torch.Tensor,
    feature_valid: torch.Tensor,
    scored: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the scored groups of each group's mean absolute error.

    A group counts when ``scored`` is True (masked, and the modality present) and it
    has at least one measured feature. When no group counts, the loss is a zero that
    stays attached to the graph, so the backward pass and DDP gradient sync still run.

    Args:
        prediction: ``(B, G, S)`` reconstructed values.
        target: ``(B, G, S)`` measured values with NaN for missing ones.
        feature_valid: ``(G, S)`` bool, False for padding slots.
        scored: ``(B, G)`` bool, the groups to score.

    Returns:
        The scalar loss and the number of groups it averages over.
    """
    per_group, count = group_l1(prediction, target, feature_valid)
    counted = scored & (count > 0)
    n_counted = counted.sum()
    # Dividing by at least one avoids a device sync; with nothing counted the
    # numerator is a graph-attached zero.
    return (per_group * counted).sum() / n_counted.clamp_min(1), n_counted
