"""``torch.compile`` of the network's parts: same names, same outputs."""

from __future__ import annotations

import pytest
import torch

from morpheus_pl.nn import Morpheus

GROUPS = {"rna": [[0, 1, 2, 7], [2, 3], [4, 5, 6]], "cnv": [[0, 1], [2], [3, 4, 5, 6, 7, 8]]}


def tiny() -> Morpheus:
    torch.manual_seed(0)
    return Morpheus(
        12, GROUPS, {"rna": 8, "cnv": 9}, width=16, num_prototypes=3, heads=2, mlp_dim=16,
        decoder_width=16, decoder_heads=2, decoder_mlp_dim=16, dropout=0.0,
    ).eval()


def test_compiling_keeps_parameter_names():
    model = tiny()
    names = list(model.state_dict())
    model.compile_parts()
    assert list(model.state_dict()) == names


@pytest.mark.slow
def test_compiled_parts_give_the_eager_outputs():
    eager, compiled = tiny(), tiny()
    compiled.compile_parts()
    patches, mask = torch.randn(4, 10, 12), torch.ones(4, 10, dtype=torch.bool)
    mask[1, 6:] = False
    omics = {"rna": torch.randn(4, 8), "cnv": torch.randn(4, 9)}
    present = {m: torch.ones(4, dtype=torch.bool) for m in GROUPS}
    outputs = []
    for model in (eager, compiled):
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            outputs.append(model.forward_pretrain(patches, mask, omics, present, 0.5, generator))
    for m in GROUPS:
        torch.testing.assert_close(outputs[0].predictions[m], outputs[1].predictions[m], atol=1e-5, rtol=1e-5)
