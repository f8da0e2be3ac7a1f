"""Slide tokenizer: learnable prototypes cross-attend over a bag of patch features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeAttention(nn.Module):
    """Turn a bag of ``N`` patch features into ``P`` slide tokens.

    ``LayerNorm`` over the patch dimension, then one single-head cross-attention in
    which ``P`` learnable prototypes (themselves layer-normed) are the queries and the
    patches the keys and values, then an output projection and ``LayerNorm``.

    The keys and values ``(B, N, width)`` are never materialised. Writing the patch
    LayerNorm as ``xhat * gamma + beta`` with ``xhat`` its parameter-free part, the
    score of prototype ``p`` on patch ``n`` is ``((q_p Wk) * gamma) . xhat_n`` plus a
    term constant over ``n`` (which the softmax cancels), and because each softmax row
    sums to one the attended value is ``Wv((sum_n a_pn xhat_n) * gamma + beta) + bv``.
    Both cost ``O(B P N D)`` instead of ``O(B N D width)``.

    Args:
        patch_dim: Patch-feature dimension ``D``.
        num_prototypes: Number of prototypes ``P``, the slide tokens per slide.
        width: Token width.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self, patch_dim: int, num_prototypes: int = 16, width: int = 256, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.patch_norm = nn.LayerNorm(patch_dim, eps=eps)
        # Random start: identical prototypes behind a LayerNorm would stay nearly
        # identical and collapse the slide tokens onto one vector.
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, width))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        self.prototype_norm = nn.LayerNorm(width, eps=eps)
        self.q_proj = nn.Linear(width, width)
        # A key bias adds the same score to every patch, which the softmax cancels.
        self.k_proj = nn.Linear(patch_dim, width, bias=False)
        self.v_proj = nn.Linear(patch_dim, width)
        self.out_proj = nn.Linear(width, width)
        self.out_norm = nn.LayerNorm(width, eps=eps)
        self.scale = 1.0 / math.sqrt(width)

    def queries(self) -> torch.Tensor:
        """Return the projected prototype queries, ``(P, width)``."""
        return self.q_proj(self.prototype_norm(self.prototypes))

    def normalize_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Return the parameter-free LayerNorm of ``(B, N, D)`` patches."""
        return F.layer_norm(patches, patches.shape[-1:], eps=self.patch_norm.eps)

    def forward(self, patches: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokenize a batch of bags.

        Args:
            patches: ``(B, N, D)`` patch features (any float dtype).
            patch_mask: ``(B, N)`` bool, True for real patches. Every bag needs at
                least one real patch.

        Returns:
            ``(B, P, width)`` slide tokens.
        """
        xhat = self.normalize_patches(patches.to(self.prototypes.dtype))
        gamma, beta = self.patch_norm.weight, self.patch_norm.bias

        # Fold the key projection and the LayerNorm scale into the queries: (P, D).
        folded = (self.queries() @ self.k_proj.weight) * gamma
        scores = torch.einsum("bnd,pd->bpn", xhat, folded.to(xhat.dtype)) * self.scale
        if patch_mask is not None:
            scores = scores.masked_fill(~patch_mask[:, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)

        # Average the normalised patches first, then apply gamma, beta and Wv: (B, P, D).
        pooled = torch.einsum("bpn,bnd->bpd", attn, xhat) * gamma + beta
        values = self.v_proj(pooled)
        return self.out_norm(self.out_proj(values))
