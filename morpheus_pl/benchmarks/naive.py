"""A naive formulation of MORPHEUS, for benchmarks and equivalence tests.

It computes the same maths as :class:`~morpheus_pl.nn.Morpheus` the obvious way: the
slide tokenizer materialises keys and values ``(B, N, width)``, and every omics group
has its own Python-level tokenizer and decoder head, called one after the other. It
is built from a fast model by copying its weights, so both give the same outputs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from morpheus_pl.nn import Morpheus
from morpheus_pl.nn.grouped import GroupedLinear, GroupedMLP, GroupIndex
from morpheus_pl.nn.slide import PrototypeAttention


class MaterializedPrototypeAttention(nn.Module):
    """Prototype cross-attention with ``K`` and ``V`` built for every patch."""

    def __init__(self, fast: PrototypeAttention) -> None:
        super().__init__()
        self.patch_norm = copy.deepcopy(fast.patch_norm)
        self.prototypes = nn.Parameter(fast.prototypes.detach().clone())
        self.prototype_norm = copy.deepcopy(fast.prototype_norm)
        self.q_proj = copy.deepcopy(fast.q_proj)
        self.k_proj = copy.deepcopy(fast.k_proj)
        self.v_proj = copy.deepcopy(fast.v_proj)
        self.out_proj = copy.deepcopy(fast.out_proj)
        self.out_norm = copy.deepcopy(fast.out_norm)
        self.scale = fast.scale

    def forward(self, patches: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.patch_norm(patches.to(self.prototypes.dtype))
        keys, values = self.k_proj(normed), self.v_proj(normed)  # (B, N, width) each
        queries = self.q_proj(self.prototype_norm(self.prototypes))
        scores = torch.einsum("pw,bnw->bpn", queries, keys) * self.scale
        if patch_mask is not None:
            scores = scores.masked_fill(~patch_mask[:, None, :], float("-inf"))
        return self.out_norm(self.out_proj(scores.softmax(dim=-1) @ values))


def linear_of(layer: GroupedLinear, group: int) -> nn.Linear:
    """Copy group ``group`` of a grouped layer into its own ``nn.Linear``."""
    n_in, n_out = layer.in_sizes[group], layer.out_sizes[group]
    linear = nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_(layer.weight[group, :n_in, :n_out].T)
        linear.bias.copy_(layer.bias[group, :n_out])
    return linear


def per_group_mlps(mlp: GroupedMLP, n_groups: int) -> nn.ModuleList:
    """Split a grouped MLP into one ``nn.Sequential`` per group."""
    modules = nn.ModuleList()
    for g in range(n_groups):
        layers = [linear_of(m, g) if isinstance(m, GroupedLinear) else copy.deepcopy(m) for m in mlp]
        modules.append(nn.Sequential(*layers))
    return modules


class LoopedTokenizer(nn.Module):
    """One tokenizer module per group, called in a Python loop on its own features."""

    def __init__(self, fast: nn.Module) -> None:
        super().__init__()
        self.index: GroupIndex = fast.index
        self.members = [fast.index.index[g, : n].tolist() for g, n in enumerate(fast.index.sizes)]
        self.groups = per_group_mlps(fast.mlp, len(self.members))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        values = torch.nan_to_num(values, nan=0.0)
        tokens = [module(values[:, members]) for module, members in zip(self.groups, self.members)]
        return torch.stack(tokens, dim=1)


class LoopedHead(nn.Module):
    """One decoder head per group, outputs padded to the largest group."""

    def __init__(self, fast: GroupedMLP, sizes: list[int]) -> None:
        super().__init__()
        self.sizes = sizes
        self.groups = per_group_mlps(fast, len(sizes))

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        outputs = [module(queries[:, g]) for g, module in enumerate(self.groups)]
        width = max(self.sizes)
        return torch.stack([F.pad(o, (0, width - o.shape[-1])) for o in outputs], dim=1)


def naive_copy(fast: Morpheus) -> Morpheus:
    """Return a copy of ``fast`` whose fast layers are replaced by naive ones."""
    naive = copy.deepcopy(fast)
    naive.slide_tokenizer = MaterializedPrototypeAttention(fast.slide_tokenizer)
    for m in fast.modalities:
        naive.tokenizers[m] = LoopedTokenizer(fast.tokenizers[m])
        if m in fast.decoders:
            naive.decoders[m].head = LoopedHead(fast.decoders[m].head, fast.tokenizers[m].index.sizes)
    return naive
