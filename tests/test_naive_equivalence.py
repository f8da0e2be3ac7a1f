"""The fast formulations equal the naive ones (keys and values materialised, loops)."""

from __future__ import annotations

import torch

from morpheus_pl.benchmarks.naive import naive_copy
from morpheus_pl.nn import Morpheus
from morpheus_pl.nn.grouped import GroupedLinear

GROUPS = {"rna": [[0, 1, 2, 7], [2, 3], [4, 5, 6]], "cnv": [[0, 1], [2], [3, 4, 5, 6, 7, 8]]}


def test_naive_model_matches_fast_with_padding():
    torch.manual_seed(0)
    fast = Morpheus(
        12, GROUPS, {"rna": 8, "cnv": 9}, width=16, num_prototypes=3, heads=2, mlp_dim=16,
        decoder_width=16, decoder_heads=2, decoder_mlp_dim=16, dropout=0.0,
    ).eval()
    naive = naive_copy(fast).eval()
    patches = torch.randn(4, 10, 12) * 2 + 0.5
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[3, 2:] = False
    omics = {"rna": torch.randn(4, 8), "cnv": torch.randn(4, 9)}
    omics["rna"][2, 1] = float("nan")
    present = {"rna": torch.tensor([True, True, False, True]), "cnv": torch.ones(4, dtype=torch.bool)}

    outputs = []
    for model in (fast, naive):
        generator = torch.Generator().manual_seed(5)
        outputs.append(model.forward_pretrain(patches, mask, omics, present, 0.5, generator))
    first, second = outputs
    torch.testing.assert_close(first.embedding, second.embedding, atol=1e-4, rtol=1e-4)
    for m in GROUPS:
        torch.testing.assert_close(first.predictions[m], second.predictions[m], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first.loss, second.loss, atol=1e-4, rtol=1e-4)

    # Gradients agree too: the naive copy is a faithful re-formulation.
    first.loss.backward()
    second.loss.backward()
    torch.testing.assert_close(
        fast.slide_tokenizer.prototypes.grad, naive.slide_tokenizer.prototypes.grad, atol=1e-4, rtol=1e-3
    )


def test_padded_weights_stay_zero_through_training():
    # Only padded layers mask their weights; the others rely on padded slots never
    # receiving a gradient, which this checks after a few optimiser steps.
    torch.manual_seed(0)
    model = Morpheus(
        12, GROUPS, {"rna": 8, "cnv": 9}, width=16, num_prototypes=3, heads=2, mlp_dim=16,
        decoder_width=16, decoder_heads=2, decoder_mlp_dim=16, dropout=0.1,
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    patches, mask = torch.randn(4, 10, 12), torch.ones(4, 10, dtype=torch.bool)
    omics = {"rna": torch.randn(4, 8), "cnv": torch.randn(4, 9)}
    present = {m: torch.ones(4, dtype=torch.bool) for m in GROUPS}
    for _ in range(3):
        out = model.forward_pretrain(patches, mask, omics, present, 0.5)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    layers = [m for m in model.modules() if isinstance(m, GroupedLinear)]
    assert any(layer.padded for layer in layers) and not all(layer.padded for layer in layers)
    for layer in layers:
        assert not layer.weight[~layer.block].any()
        assert not layer.bias[~layer.out_valid].any()
