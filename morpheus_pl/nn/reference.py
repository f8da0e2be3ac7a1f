"""Direct, slow formulations of the fast layers, for tests and benchmarks.

Each function computes the same maths as a fast layer the obvious way (keys and
values materialised, one Python-level step per group) from the fast layer's own
parameters, so outputs can be compared with shared weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from morpheus_pl.nn.grouped import GroupedLinear
from morpheus_pl.nn.slide import PrototypeAttention


def prototype_attention_materialized(
    layer: PrototypeAttention, patches: torch.Tensor, patch_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Slide tokens with ``K`` and ``V`` of shape ``(B, N, width)`` built explicitly."""
    normed = layer.patch_norm(patches.to(layer.prototypes.dtype))
    keys = layer.k_proj(normed)
    values = layer.v_proj(normed)
    queries = layer.queries()
    scores = torch.einsum("pw,bnw->bpn", queries, keys) * layer.scale
    if patch_mask is not None:
        scores = scores.masked_fill(~patch_mask[:, None, :], float("-inf"))
    attended = scores.softmax(dim=-1) @ values
    return layer.out_norm(layer.out_proj(attended))


def grouped_linear_looped(layer: GroupedLinear, x: torch.Tensor) -> torch.Tensor:
    """``GroupedLinear`` as one ``F.linear`` per group on the unpadded slices."""
    out = x.new_zeros(x.shape[0], x.shape[1], layer.weight.shape[2])
    for g, (n_in, n_out) in enumerate(zip(layer.in_sizes, layer.out_sizes)):
        weight = layer.weight[g, :n_in, :n_out].T
        out[:, g, :n_out] = F.linear(x[:, g, :n_in], weight, layer.bias[g, :n_out])
    return out
