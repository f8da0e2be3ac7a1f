"""Model maths as plain ``nn.Module``s and functions, free of Lightning."""

from morpheus_pl.nn.grouped import GroupedLinear, GroupedMLP, GroupIndex
from morpheus_pl.nn.losses import group_l1, masked_group_l1
from morpheus_pl.nn.masking import (
    choose_visible,
    draws_per_sample,
    sample_visible,
    seeded_uniform,
    split_budget,
    visible_budget,
)
from morpheus_pl.nn.morpheus import (
    EncoderOutput,
    Morpheus,
    OmicsDecoder,
    OmicsTokenizer,
    ReconstructionOutput,
)
from morpheus_pl.nn.slide import PrototypeAttention

__all__ = [
    "EncoderOutput",
    "GroupIndex",
    "GroupedLinear",
    "GroupedMLP",
    "Morpheus",
    "OmicsDecoder",
    "OmicsTokenizer",
    "PrototypeAttention",
    "ReconstructionOutput",
    "choose_visible",
    "draws_per_sample",
    "group_l1",
    "masked_group_l1",
    "sample_visible",
    "seeded_uniform",
    "split_budget",
    "visible_budget",
]
