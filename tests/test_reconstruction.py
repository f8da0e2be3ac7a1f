"""Tests of any-to-any reconstruction and prediction requests."""

from __future__ import annotations

import pytest
import torch

from morpheus_pl.errors import InputError
from morpheus_pl.nn import GroupIndex, Morpheus
from morpheus_pl.reconstruction import resolve_request
from morpheus_pl.reconstruction import groups_to_features, predict

GROUPS = {"rna": [[0, 1, 2], [2, 3], [4, 5]], "dnam": [[0, 1], [2, 3]], "cnv": [[0], [1, 2]]}
N_FEATURES = {"rna": 6, "dnam": 4, "cnv": 3}


def small_model() -> Morpheus:
    torch.manual_seed(0)
    return Morpheus(
        8, GROUPS, N_FEATURES, width=16, num_prototypes=3, heads=2, mlp_dim=16,
        decoder_width=16, decoder_heads=2, decoder_mlp_dim=16, dropout=0.0,
    ).eval()


def batch_of(n: int = 5, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=gen)
    patches = torch.randn(n, 8, 8, generator=gen)
    mask = torch.arange(8)[None] < lengths[:, None]
    patches = patches * mask[..., None]
    omics = {m: torch.randn(n, f, generator=gen) for m, f in N_FEATURES.items()}
    present = {m: torch.ones(n, dtype=torch.bool) for m in N_FEATURES}
    return {"patches": patches, "mask": mask, "omics": omics, "present": present}


def run(model, b, inputs, targets):
    return predict(model, b["patches"], b["mask"], b["omics"], b["present"], inputs, targets)


def test_groups_to_features_averages_overlaps():
    index = GroupIndex([[0, 1], [1, 2]], n_features=4)
    grouped = torch.tensor([[[1.0, 3.0], [5.0, 7.0]]])
    features = groups_to_features(grouped, index)
    assert features[0, :3].tolist() == [1.0, 4.0, 7.0]
    assert torch.isnan(features[0, 3])


def test_target_values_never_used():
    model, b = small_model(), batch_of()
    first = run(model, b, ["rna"], ["dnam"])
    b["omics"]["dnam"] = b["omics"]["dnam"] * 100 + 7
    second = run(model, b, ["rna"], ["dnam"])
    torch.testing.assert_close(first.reconstructions["dnam"], second.reconstructions["dnam"])
    assert "dnam" not in first.omics_tokens


def test_inputs_change_the_reconstruction():
    model, b = small_model(), batch_of()
    from_slide = run(model, b, [], ["dnam"]).reconstructions["dnam"]
    from_rna = run(model, b, ["rna"], ["dnam"]).reconstructions["dnam"]
    assert not torch.allclose(from_slide, from_rna)


def test_same_result_for_any_batch_size_and_order():
    model, b = small_model(), batch_of(n=6)
    whole = run(model, b, ["rna", "cnv"], ["dnam"])
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    shuffled = {
        "patches": b["patches"][order],
        "mask": b["mask"][order],
        "omics": {m: v[order] for m, v in b["omics"].items()},
        "present": {m: v[order] for m, v in b["present"].items()},
    }
    again = run(model, shuffled, ["rna", "cnv"], ["dnam"])
    torch.testing.assert_close(again.reconstructions["dnam"], whole.reconstructions["dnam"][order], atol=1e-5, rtol=1e-5)
    for i in range(6):
        # One patient at a time, with its bag trimmed to its real patches.
        n = int(b["mask"][i].sum())
        single = {
            "patches": b["patches"][i : i + 1, :n],
            "mask": b["mask"][i : i + 1, :n],
            "omics": {m: v[i : i + 1] for m, v in b["omics"].items()},
            "present": {m: v[i : i + 1] for m, v in b["present"].items()},
        }
        alone = run(model, single, ["rna", "cnv"], ["dnam"])
        torch.testing.assert_close(alone.reconstructions["dnam"][0], whole.reconstructions["dnam"][i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.embedding[0], whole.embedding[i], atol=1e-5, rtol=1e-5)


def test_missing_input_modality_is_skipped_for_that_patient():
    model, b = small_model(), batch_of()
    b["present"]["rna"][2] = False
    with_rna = run(model, b, ["rna"], ["dnam"])
    b["omics"]["rna"][2] = 1000.0
    again = run(model, b, ["rna"], ["dnam"])
    torch.testing.assert_close(with_rna.reconstructions["dnam"][2], again.reconstructions["dnam"][2])
    slide_only = run(model, {**b}, [], ["dnam"])
    torch.testing.assert_close(with_rna.reconstructions["dnam"][2], slide_only.reconstructions["dnam"][2], atol=1e-5, rtol=1e-5)


def test_request_needs_the_slide():
    with pytest.raises(InputError, match="do not include the slide"):
        resolve_request(["rna"], ["dnam"], ["rna", "dnam"], ["rna", "dnam"])


def test_request_target_without_decoder():
    with pytest.raises(InputError, match=r"no decoder for target modalities \['cnv'\]"):
        resolve_request(["slide"], ["cnv"], ["rna", "dnam"], ["rna", "dnam"])


def test_request_target_among_inputs():
    with pytest.raises(InputError, match=r"modalities \['rna'\] are both inputs and targets"):
        resolve_request(["slide", "rna"], ["rna"], ["rna", "dnam"], ["rna", "dnam"])


def test_request_defaults():
    request = resolve_request(None, None, ["rna", "dnam"], ["rna", "dnam"])
    assert request.inputs == []
    assert request.targets == ["rna", "dnam"]
    request = resolve_request(["slide", "rna"], None, ["rna", "dnam"], ["rna", "dnam"])
    assert request.targets == ["dnam"]
