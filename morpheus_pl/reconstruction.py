"""Any-to-any omics reconstruction and patient embeddings from a pre-trained model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from morpheus_pl.errors import InputError
from morpheus_pl.nn import Morpheus
from morpheus_pl.nn.grouped import GroupIndex

#: Name of the slide among prediction inputs.
SLIDE = "slide"


def groups_to_features(prediction: torch.Tensor, index: GroupIndex) -> torch.Tensor:
    """Average per-group reconstructions into one value per feature.

    A feature that belongs to several groups gets the mean of its groups' predictions.

    Args:
        prediction: ``(B, G, S)`` per-group reconstruction.
        index: The modality's group index.

    Returns:
        ``(B, F)`` reconstruction; NaN for a feature in no group.
    """
    batch = prediction.shape[0]
    slots = index.index[index.valid]
    values = prediction[:, index.valid]
    total = prediction.new_zeros(batch, index.n_features).index_add_(1, slots, values)
    count = torch.zeros(index.n_features, device=prediction.device).index_add_(
        0, slots, torch.ones_like(slots, dtype=torch.float32)
    )
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


@dataclass
class Prediction:
    """Outputs of one prediction pass over a batch.

    Attributes:
        embedding: ``(B, width)`` patient embeddings (the global token).
        slide_tokens: ``(B, P, width)`` encoder outputs at the slide tokens.
        omics_tokens: Input modality to ``(B, G_m, width)`` encoder outputs of its
            tokens (zero where the patient lacks the modality).
        reconstructions: Target modality to ``(B, F_m)`` reconstructed values, in the
            model's (scaled) units.
    """

    embedding: torch.Tensor
    slide_tokens: torch.Tensor
    omics_tokens: dict[str, torch.Tensor]
    reconstructions: dict[str, torch.Tensor]


class PredictionRequest:
    """Inputs and targets of a prediction pass.

    Attributes:
        inputs: Omics modalities given to the encoder with the slide.
        targets: Modalities to reconstruct.
        token_outputs: Also return the encoder outputs at the slide and omics tokens.
    """

    def __init__(self, inputs: Sequence[str], targets: Sequence[str], token_outputs: bool = False) -> None:
        self.inputs = list(inputs)
        self.targets = list(targets)
        self.token_outputs = token_outputs


def resolve_request(
    inputs: Sequence[str] | None,
    targets: Sequence[str] | None,
    modalities: Sequence[str],
    decoders: Sequence[str],
    token_outputs: bool = False,
) -> PredictionRequest:
    """Check requested inputs and targets against the checkpoint.

    Args:
        inputs: Requested inputs; must contain ``slide``. None means the slide only.
        targets: Requested targets; None means every modality with a decoder that is
            not an input.
        modalities: Omics modalities of the checkpoint.
        decoders: Modalities the checkpoint has a decoder for.
        token_outputs: Also return token outputs.
    """
    inputs = [SLIDE] if inputs is None else list(inputs)
    if SLIDE not in inputs:
        raise InputError(
            f"prediction inputs {inputs} do not include the slide: MORPHEUS always encodes the "
            "slide, so add 'slide' to the inputs"
        )
    omics_inputs = [m for m in inputs if m != SLIDE]
    unknown = sorted(set(omics_inputs) - set(modalities))
    if unknown:
        raise InputError(
            f"prediction inputs {unknown} are not modalities of the checkpoint ({sorted(modalities)})"
        )
    if targets is None:
        targets = [m for m in decoders if m not in omics_inputs]
    no_decoder = sorted(set(targets) - set(decoders))
    if no_decoder:
        raise InputError(
            f"the checkpoint has no decoder for target modalities {no_decoder}; it reconstructs "
            f"{sorted(decoders)}"
        )
    both = sorted(set(targets) & set(omics_inputs))
    if both:
        raise InputError(
            f"modalities {both} are both inputs and targets; a target is reconstructed without "
            "its own values, so remove it from the inputs"
        )
    return PredictionRequest(omics_inputs, list(targets), token_outputs)



@torch.no_grad()
def predict(
    model: Morpheus,
    patches: torch.Tensor,
    patch_mask: torch.Tensor | None,
    omics: Mapping[str, torch.Tensor],
    present: Mapping[str, torch.Tensor],
    inputs: Sequence[str],
    targets: Sequence[str],
) -> Prediction:
    """Embed patients from the slide and ``inputs``, and reconstruct each target.

    Every token of an input modality the patient has is visible; a modality the
    patient lacks adds no token. Targets are decoded from mask-token queries only,
    and their own values never enter the encoder.

    Args:
        model: The network, in eval mode.
        patches: ``(B, N, D)`` patch features.
        patch_mask: ``(B, N)`` bool, True for real patches, or None.
        omics: Modality name to ``(B, F_m)`` values (only ``inputs`` are read).
        present: Modality name to ``(B,)`` bool.
        inputs: Omics modalities given to the encoder besides the slide.
        targets: Modalities to reconstruct.
    """
    resolve_request([SLIDE, *inputs], targets, model.modalities, list(model.decoders))
    visible = {
        m: present[m].to(torch.bool)[:, None].expand(-1, len(model.tokenizers[m].index.sizes))
        for m in inputs
    }
    encoded = model.encode(patches, patch_mask, {m: omics[m] for m in inputs}, visible)
    reconstructions = {}
    for m in targets:
        grouped = model.decode(encoded, m)
        reconstructions[m] = groups_to_features(grouped, model.tokenizers[m].index)
    return Prediction(
        embedding=encoded.embedding,
        slide_tokens=encoded.slide_tokens,
        omics_tokens=encoded.omics_tokens,
        reconstructions=reconstructions,
    )
