"""Unit tests of the model maths (plain nn.Modules)."""

from __future__ import annotations

import pytest
import torch

from morpheus_pl.nn import (
    GroupedLinear,
    GroupIndex,
    Morpheus,
    PrototypeAttention,
    masked_group_l1,
)
from morpheus_pl.nn.reference import grouped_linear_looped, prototype_attention_materialized

GROUPS = {
    "rna": [[0, 1, 2], [2, 3], [4, 5, 6, 7], [1, 7]],
    "dnam": [[0], [1, 2], [3, 4], [5]],
}
N_FEATURES = {"rna": 8, "dnam": 6}


def small_model(**kwargs) -> Morpheus:
    options = dict(
        width=16,
        num_prototypes=4,
        heads=2,
        mlp_dim=16,
        decoder_width=16,
        decoder_heads=2,
        decoder_mlp_dim=16,
        dropout=0.0,
    )
    options.update(kwargs)
    return Morpheus(12, GROUPS, N_FEATURES, **options)


def small_batch(batch: int = 6, n: int = 9, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    patches = torch.randn(batch, n, 12, generator=gen)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, 4:] = False
    omics = {m: torch.randn(batch, f, generator=gen) for m, f in N_FEATURES.items()}
    present = {m: torch.ones(batch, dtype=torch.bool) for m in N_FEATURES}
    return {"patches": patches, "mask": mask, "omics": omics, "present": present}


def test_prototype_attention_matches_materialized():
    torch.manual_seed(0)
    layer = PrototypeAttention(24, num_prototypes=5, width=32)
    with torch.no_grad():
        layer.patch_norm.weight.normal_()
        layer.patch_norm.bias.normal_()
    patches = torch.randn(3, 17, 24) * 3 + 1
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 1:] = False
    fast = layer(patches, mask)
    slow = prototype_attention_materialized(layer, patches, mask)
    assert fast.shape == (3, 5, 32)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def test_prototype_attention_ignores_padding():
    torch.manual_seed(0)
    layer = PrototypeAttention(8, num_prototypes=3, width=16)
    patches = torch.randn(1, 5, 8)
    padded = torch.cat([patches, torch.randn(1, 4, 8) * 100], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 4])
    torch.testing.assert_close(layer(patches), layer(padded, mask), atol=1e-5, rtol=1e-5)


def test_prototypes_start_distinct():
    layer = PrototypeAttention(8, num_prototypes=16, width=32)
    queries = torch.nn.functional.normalize(layer.queries(), dim=-1)
    similarity = queries @ queries.T
    off_diagonal = similarity[~torch.eye(16, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.9


def test_grouped_linear_matches_loop():
    torch.manual_seed(0)
    layer = GroupedLinear([3, 1, 5], [2, 4, 4])
    x = torch.randn(7, 3, 5)
    # Values in padding slots must not leak into any output.
    x_clean = x.clone()
    for g, n in enumerate(layer.in_sizes):
        x_clean[:, g, n:] = 0
    torch.testing.assert_close(layer(x_clean), grouped_linear_looped(layer, x_clean))
    assert torch.all(layer(x_clean)[:, 0, 2:] == 0)


def test_group_index_pads_with_zero():
    index = GroupIndex([[2, 0], [1]], n_features=3)
    values = torch.tensor([[10.0, 20.0, 30.0]])
    gathered = index(values)
    assert gathered.tolist() == [[[30.0, 10.0], [20.0, 0.0]]]
    assert index.valid.tolist() == [[True, True], [True, False]]


def test_group_index_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        GroupIndex([[0, 5]], n_features=3)


def test_pretrain_output_shapes():
    model = small_model()
    b = small_batch()
    out = model.forward_pretrain(b["patches"], b["mask"], b["omics"], b["present"], 0.5)
    assert out.predictions["rna"].shape == (6, 4, 4)
    assert out.predictions["dnam"].shape == (6, 4, 2)
    assert out.embedding.shape == (6, 16)
    assert out.slide_tokens.shape == (6, 4, 16)
    assert out.loss.ndim == 0
    assert torch.isfinite(out.loss)


def test_every_parameter_gets_gradient():
    model = small_model(modality_embeddings=True, group_embeddings=True)
    b = small_batch()
    out = model.forward_pretrain(b["patches"], b["mask"], b["omics"], b["present"], 0.5)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert zero == []


def test_missing_modality_is_neither_input_nor_target():
    model = small_model().eval()
    b = small_batch()
    b["present"]["dnam"][[1, 3]] = False
    out = model.forward_pretrain(b["patches"], b["mask"], b["omics"], b["present"], 0.5)
    assert not out.scored["dnam"][[1, 3]].any()

    # Changing the absent modality's values changes nothing for those patients.
    changed = {m: v.clone() for m, v in b["omics"].items()}
    changed["dnam"][[1, 3]] = 1000.0
    torch.manual_seed(3)
    first = model.forward_pretrain(b["patches"], b["mask"], b["omics"], b["present"], 0.5)
    torch.manual_seed(3)
    second = model.forward_pretrain(b["patches"], b["mask"], changed, b["present"], 0.5)
    torch.testing.assert_close(first.embedding, second.embedding)
    torch.testing.assert_close(first.loss, second.loss)


def test_modality_absent_from_batch_counts_as_missing():
    model = small_model()
    b = small_batch()
    omics = {"rna": b["omics"]["rna"]}
    out = model.forward_pretrain(b["patches"], b["mask"], omics, b["present"], 0.5)
    assert not out.scored["dnam"].any()
    assert out.losses["dnam"].item() == 0.0
    out.loss.backward()


def test_loss_ignores_nan_features():
    prediction = torch.tensor([[[1.0, 2.0, 3.0]]])
    target = torch.tensor([[[2.0, float("nan"), 5.0]]])
    valid = torch.tensor([[True, True, True]])
    scored = torch.tensor([[True]])
    loss, n = masked_group_l1(prediction, target, valid, scored)
    assert loss.item() == pytest.approx(1.5)
    assert n.item() == 1


def test_loss_averages_over_masked_groups():
    prediction = torch.zeros(2, 2, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0]], [[4.0, 4.0], [8.0, float("nan")]]])
    valid = torch.tensor([[True, True], [True, False]])
    scored = torch.tensor([[True, False], [True, True]])
    loss, n = masked_group_l1(prediction, target, valid, scored)
    assert n.item() == 3
    assert loss.item() == pytest.approx((1.0 + 4.0 + 8.0) / 3)


def test_loss_zero_and_attached_when_nothing_masked():
    model = small_model()
    b = small_batch()
    out = model.forward_pretrain(b["patches"], b["mask"], b["omics"], b["present"], 0.0)
    assert out.loss.item() == 0.0
    assert not torch.isnan(out.loss)
    assert out.loss.requires_grad
    out.loss.backward()


def test_loss_zero_when_only_group_is_all_nan():
    prediction = torch.ones(1, 1, 2, requires_grad=True)
    target = torch.full((1, 1, 2), float("nan"))
    loss, n = masked_group_l1(prediction, target, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == 0.0
    assert n.item() == 0
    loss.backward()
    assert torch.all(prediction.grad == 0)


def test_slide_tokens_always_visible():
    model = small_model().eval()
    b = small_batch()
    encoded = model.encode(
        b["patches"],
        b["mask"],
        b["omics"],
        {m: torch.zeros(6, len(GROUPS[m]), dtype=torch.bool) for m in GROUPS},
    )
    # Global token plus every slide token, no omics token.
    assert encoded.tokens.shape[1] == 1 + 4
    assert encoded.mask.all()


def test_visible_tokens_reach_decoder_and_masked_do_not():
    model = small_model().eval()
    b = small_batch()
    visible = {m: torch.zeros(6, len(GROUPS[m]), dtype=torch.bool) for m in GROUPS}
    visible["rna"][:, 0] = True
    encoded = model.encode(b["patches"], b["mask"], b["omics"], visible)
    assert encoded.tokens.shape[1] == 1 + 4 + 1
    assert torch.all(encoded.omics_tokens["rna"][:, 1:] == 0)
    assert torch.all(encoded.omics_tokens["rna"][:, 0].abs().sum(-1) > 0)

    # Values of a masked group have no influence on the embedding.
    changed = {m: v.clone() for m, v in b["omics"].items()}
    changed["rna"][:, 3] += 50.0  # feature 3 is only in group 1, which is masked
    again = model.encode(b["patches"], b["mask"], changed, visible)
    torch.testing.assert_close(encoded.embedding, again.embedding)


def test_unequal_visible_counts_are_padded():
    model = small_model().eval()
    b = small_batch()
    visible = {m: torch.zeros(6, len(GROUPS[m]), dtype=torch.bool) for m in GROUPS}
    visible["rna"][0] = True
    encoded = model.encode(b["patches"], b["mask"], b["omics"], visible)
    assert encoded.tokens.shape[1] == 1 + 4 + 4
    assert encoded.mask[0].all()
    assert not encoded.mask[1:, 5:].any()

    # A sample's embedding does not depend on the padding added for the others.
    alone = model.encode(
        b["patches"][1:2], b["mask"][1:2], {m: v[1:2] for m, v in b["omics"].items()},
        {m: v[1:2] for m, v in visible.items()},
    )
    torch.testing.assert_close(alone.embedding, encoded.embedding[1:2], atol=1e-5, rtol=1e-5)


def test_decode_unknown_modality_raises():
    model = small_model()
    b = small_batch()
    encoded = model.encode(b["patches"], b["mask"], b["omics"], {})
    with pytest.raises(KeyError, match="no decoder for modality 'cnv'"):
        model.decode(encoded, "cnv")
