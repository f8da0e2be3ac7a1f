"""Any-to-any omics reconstruction and patient embeddings from a pre-trained model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from morpheus_pl.nn import Morpheus
from morpheus_pl.nn.grouped import GroupIndex


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


def check_request(model: Morpheus, inputs: Sequence[str], targets: Sequence[str]) -> None:
    """Raise ``ValueError`` for unknown inputs or targets, or a target among the inputs."""
    unknown = sorted(set(inputs) - set(model.modalities))
    if unknown:
        raise ValueError(f"input modalities {unknown} are unknown to the model ({model.modalities})")
    no_decoder = sorted(set(targets) - set(model.decoders))
    if no_decoder:
        raise ValueError(
            f"the checkpoint has no decoder for target modalities {no_decoder}; it has decoders "
            f"for {sorted(model.decoders)}"
        )
    both = sorted(set(inputs) & set(targets))
    if both:
        raise ValueError(
            f"modalities {both} are both input and target; a target is reconstructed without "
            "its own values, so remove it from the inputs"
        )


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
    check_request(model, inputs, targets)
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
