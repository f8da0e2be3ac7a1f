"""Random choice of the omics tokens kept visible during masked pre-training."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def visible_budget(n_tokens: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Return ``floor(T * (1 - mask_ratio))`` for each sample's omics token count ``T``.

    A small tolerance keeps the floor exact when ``1 - mask_ratio`` is not exactly
    representable (``50 * (1 - 0.8)`` is ``9.999...`` in float64).
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
    keep = n_tokens.to(torch.float64) * (1.0 - mask_ratio)
    return torch.floor(keep + 1e-9).to(torch.long)


def split_budget(
    group_counts: Sequence[int],
    present: torch.Tensor,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split each sample's visible-token budget across the modalities it has.

    The budget is ``floor(T * (1 - mask_ratio))``, with ``T`` the number of omics
    tokens of the modalities present. A Dirichlet(1, ..., 1) draw over those modalities
    divides it, and rounding makes the counts sum exactly to the budget without giving
    any modality more tokens than it has.

    Args:
        group_counts: Tokens per modality, ``(M,)``.
        present: ``(B, M)`` bool, which modalities each sample has.
        mask_ratio: Fraction of omics tokens to mask.
        generator: Random generator on ``present``'s device.
        uniform: ``(B, M)`` draws in [0, 1) to use instead of drawing from ``generator``.

    Returns:
        ``(B, M)`` long visible counts; zero for absent modalities.
    """
    device = present.device
    sizes = torch.as_tensor(list(group_counts), dtype=torch.long, device=device)
    capacity = sizes * present
    budget = visible_budget(capacity.sum(dim=1), mask_ratio)

    # Dirichlet(1, ..., 1) over the present modalities: normalised Exp(1) draws.
    if uniform is None:
        uniform = torch.rand(present.shape, generator=generator, device=device, dtype=torch.float64)
    weights = -torch.log1p(-uniform) * present
    total = weights.sum(dim=1, keepdim=True)
    shares = torch.where(total > 0, weights / total.clamp_min(1e-300), torch.zeros_like(weights))

    # Largest-remainder rounding so that each row sums exactly to its budget.
    exact = shares * budget[:, None]
    counts = exact.floor().to(torch.long)
    fraction = torch.where(present, exact - counts, torch.full_like(exact, -1.0))
    rank = fraction.argsort(dim=1, descending=True).argsort(dim=1)
    counts += (rank < (budget - counts.sum(dim=1))[:, None]).to(torch.long)

    # Move any count above a modality's capacity to modalities with room left.
    overflow = (counts - capacity).clamp_min(0).sum(dim=1)
    counts = torch.minimum(counts, capacity)
    for m in range(len(sizes)):
        extra = torch.minimum(capacity[:, m] - counts[:, m], overflow)
        counts[:, m] += extra
        overflow -= extra
    return counts


def choose_visible(
    counts: torch.Tensor,
    n_groups: int,
    generator: torch.Generator | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick ``counts[b]`` of ``n_groups`` tokens uniformly at random for each sample.

    Args:
        counts: ``(B,)`` long, how many tokens to keep visible per sample.
        n_groups: Number of tokens ``G`` of the modality.
        generator: Random generator on ``counts``' device.
        scores: ``(B, G)`` random keys to use instead of drawing from ``generator``.
            The ``counts[b]`` tokens with the smallest keys are kept.

    Returns:
        ``(B, G)`` bool, True for visible tokens.
    """
    if scores is None:
        scores = torch.rand(counts.shape[0], n_groups, generator=generator, device=counts.device)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return rank < counts[:, None]


def draws_per_sample(group_counts: Sequence[int]) -> int:
    """Return how many uniform draws ``sample_visible`` uses per sample: ``M + sum(G_m)``."""
    return len(group_counts) + sum(group_counts)


def seeded_uniform(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """Draw ``(B, n)`` float64 values in [0, 1), row ``b`` seeded with ``seeds[b]``.

    A row depends only on its seed, so a sample keeps its draws whichever batch or
    process it lands in. The rows are drawn on the CPU, one small draw per sample, and
    returned on ``seeds``' device.
    """
    generator = torch.Generator()
    rows = []
    for seed in seeds.tolist():
        generator.manual_seed(int(seed))
        rows.append(torch.rand(n, generator=generator, dtype=torch.float64))
    drawn = torch.stack(rows) if rows else torch.empty(0, n, dtype=torch.float64)
    return drawn.to(seeds.device)


def sample_visible(
    group_counts: Sequence[int],
    present: torch.Tensor,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Draw the visible omics tokens of each modality for a batch.

    Args:
        group_counts: Tokens per modality, ``(M,)``.
        present: ``(B, M)`` bool, which modalities each sample has.
        mask_ratio: Fraction of omics tokens to mask.
        generator: Random generator on ``present``'s device.
        uniform: ``(B, draws_per_sample(group_counts))`` draws in [0, 1) to use
            instead of ``generator``: the first ``M`` columns split the budget, the next
            ``G_1`` rank the first modality's tokens, and so on.

    Returns:
        One ``(B, G_m)`` bool tensor per modality, in the order of ``group_counts``. An
        absent modality has no visible token.
    """
    if uniform is None:
        counts = split_budget(group_counts, present, mask_ratio, generator)
        return [choose_visible(counts[:, m], g, generator) for m, g in enumerate(group_counts)]

    expected = (present.shape[0], draws_per_sample(group_counts))
    if tuple(uniform.shape) != expected:
        raise ValueError(f"uniform has shape {tuple(uniform.shape)}, expected {expected}")
    n_modalities = len(group_counts)
    counts = split_budget(group_counts, present, mask_ratio, uniform=uniform[:, :n_modalities])
    keys = uniform[:, n_modalities:].split(list(group_counts), dim=1)
    return [
        choose_visible(counts[:, m], g, scores=keys[m]) for m, g in enumerate(group_counts)
    ]

