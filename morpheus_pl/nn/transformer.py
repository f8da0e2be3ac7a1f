"""Pre-norm transformer blocks on ``scaled_dot_product_attention``.

``F.scaled_dot_product_attention`` picks the flash or memory-efficient kernel on GPU
when the inputs allow it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _key_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Turn a ``(B, L)`` True-is-valid key mask into an additive ``(B, 1, 1, L)`` bias."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, float("-inf"))[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention of queries over keys and values (self- or cross-attention).

    Args:
        width: Token width, split evenly across heads.
        heads: Number of attention heads.
        dropout: Dropout on the attention weights and on the output.
        kv_width: Width of the key/value tokens when it differs from ``width``.
    """

    def __init__(
        self, width: int, heads: int, dropout: float = 0.0, kv_width: int | None = None
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(kv_width or width, 2 * width)
        self.out_proj = nn.Linear(width, width)
        self.out_dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend ``(B, Lq, width)`` queries over ``(B, Lk, kv_width)`` keys.

        ``keys`` defaults to ``queries`` (self-attention); ``key_mask`` is ``(B, Lk)``
        bool with True for real tokens.
        """
        keys = queries if keys is None else keys
        b, lq, width = queries.shape
        q = self.q_proj(queries).view(b, lq, self.heads, -1).transpose(1, 2)
        k, v = self.kv_proj(keys).view(b, keys.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)

        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=_key_mask(key_mask, q.dtype),
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(b, lq, width)
        return self.out_dropout(self.out_proj(out))


class MLP(nn.Sequential):
    """``width -> hidden -> width`` with GELU and dropout."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
            nn.Dropout(dropout),
        )


class EncoderBlock(nn.Module):
    """Pre-norm self-attention block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Update ``(B, L, width)`` tokens; ``mask`` is ``(B, L)`` True-is-valid."""
        x = x + self.attn(self.norm1(x), key_mask=mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Pre-norm self-attention over queries, cross-attention to a memory, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.memory_norm = nn.LayerNorm(width)
        self.cross_attn = Attention(width, heads, dropout)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_dim, dropout)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Update ``(B, Lq, width)`` queries using ``(B, Lm, width)`` memory tokens."""
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), self.memory_norm(memory), key_mask=memory_mask)
        return x + self.mlp(self.norm3(x))
