"""Per-group linear maps computed for all groups of a modality in one einsum.

Each omics token comes from its own small network over the features of its group.
Groups have different sizes, so the per-group weights are zero-padded to the largest
group and applied with one batched contraction instead of a Python loop over groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class GroupIndex(nn.Module):
    """Gather a modality's feature vector into zero-padded per-group blocks.

    Args:
        groups: For each of the ``G`` groups, the indices of its features in the
            modality's feature vector. A feature may belong to several groups.
        n_features: Length ``F`` of the modality's feature vector.
    """

    def __init__(self, groups: Sequence[Sequence[int]], n_features: int) -> None:
        super().__init__()
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError("every token group needs at least one feature")
        width = max(len(g) for g in groups)

        # Padding slots point at an extra all-zero column appended at gather time.
        index = torch.full((len(groups), width), n_features, dtype=torch.long)
        for row, members in enumerate(groups):
            members = torch.as_tensor(list(members), dtype=torch.long)
            if bool(((members < 0) | (members >= n_features)).any()):
                raise ValueError(f"group {row} has feature indices outside [0, {n_features})")
            index[row, : len(members)] = members

        self.n_features = n_features
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("valid", index < n_features, persistent=False)
        self.sizes = [len(g) for g in groups]

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Gather ``(B, F)`` values into ``(B, G, max_group_size)``; padding is 0."""
        padded = torch.cat([values, values.new_zeros(values.shape[0], 1)], dim=1)
        return padded[:, self.index]


class GroupedLinear(nn.Module):
    """``G`` independent linear layers evaluated as one einsum.

    Group ``g`` maps its first ``in_sizes[g]`` inputs to its first ``out_sizes[g]``
    outputs. Weights outside each group's block are held at zero by a fixed mask, so
    padded inputs never reach the outputs and padded outputs are always zero.

    Args:
        in_sizes: Input size per group, or one size shared by all groups.
        out_sizes: Output size per group, or one size shared by all groups.
        n_groups: Number of groups when both sizes are shared integers.
    """

    def __init__(
        self,
        in_sizes: Sequence[int] | int,
        out_sizes: Sequence[int] | int,
        n_groups: int | None = None,
    ) -> None:
        super().__init__()
        if n_groups is None:
            for sizes in (in_sizes, out_sizes):
                if not isinstance(sizes, int):
                    n_groups = len(sizes)
        if n_groups is None:
            raise ValueError("n_groups is required when in_sizes and out_sizes are both integers")
        ins = [in_sizes] * n_groups if isinstance(in_sizes, int) else list(in_sizes)
        outs = [out_sizes] * n_groups if isinstance(out_sizes, int) else list(out_sizes)
        if len(ins) != n_groups or len(outs) != n_groups:
            raise ValueError("in_sizes and out_sizes must both have one entry per group")

        self.in_sizes, self.out_sizes = ins, outs
        self.weight = nn.Parameter(torch.empty(n_groups, max(ins), max(outs)))
        self.bias = nn.Parameter(torch.empty(n_groups, max(outs)))
        block = torch.zeros(n_groups, max(ins), max(outs), dtype=torch.bool)
        for g, (n_in, n_out) in enumerate(zip(ins, outs)):
            block[g, :n_in, :n_out] = True
        self.register_buffer("block", block, persistent=False)
        self.register_buffer("out_valid", block.any(dim=1), persistent=False)
        # Layers whose groups all have the full sizes need no mask (the hidden layers).
        self.padded = not bool(block.all())
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise each group like ``nn.Linear`` with its own fan-in."""
        bound = torch.tensor([1.0 / math.sqrt(n) for n in self.in_sizes])
        self.weight.uniform_(-1.0, 1.0).mul_(bound[:, None, None]).mul_(self.block)
        self.bias.uniform_(-1.0, 1.0).mul_(bound[:, None]).mul_(self.out_valid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, G, max_in)`` to ``(B, G, max_out)``."""
        if not self.padded:
            return torch.einsum("bgi,gio->bgo", x, self.weight) + self.bias
        weight = self.weight * self.block
        out = torch.einsum("bgi,gio->bgo", x, weight)
        return out + self.bias * self.out_valid


class GroupedMLP(nn.Sequential):
    """Per-group MLP ``in_g -> hidden -> ... -> out_g`` with ELU (and optional AlphaDropout).

    Args:
        in_sizes: Input size per group, or one shared size.
        hidden: Widths of the hidden layers, shared by all groups.
        out_sizes: Output size per group, or one shared size.
        n_groups: Number of groups ``G``.
        dropout: AlphaDropout rate after each ELU.
        final_activation: Apply ELU (and dropout) after the last layer too.
    """

    def __init__(
        self,
        in_sizes: Sequence[int] | int,
        hidden: Sequence[int],
        out_sizes: Sequence[int] | int,
        n_groups: int,
        dropout: float = 0.0,
        final_activation: bool = False,
    ) -> None:
        sizes: list[Sequence[int] | int] = [in_sizes, *hidden, out_sizes]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(GroupedLinear(sizes[i], sizes[i + 1], n_groups=n_groups))
            if i < len(sizes) - 2 or final_activation:
                layers.append(nn.ELU())
                if dropout > 0:
                    layers.append(nn.AlphaDropout(dropout))
        super().__init__(*layers)
