"""Initialising a downstream encoder from a pre-training checkpoint."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from morpheus_pl.errors import InputError

#: Encoder settings that must match the checkpoint for its weights to load.
ARCHITECTURE_KEYS = (
    "width",
    "num_prototypes",
    "depth",
    "heads",
    "mlp_dim",
    "modality_embeddings",
    "group_embeddings",
)


@dataclass
class LoadReport:
    """Record of the tensors a module loaded from a checkpoint, skipped or left new."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)

    def summary(self, also_new: str = "") -> str:
        """Return a few lines grouping tensor names by their first two name parts.

        ``also_new`` names modules outside the report that start untrained (a head).
        """

        def grouped(names: Sequence[str]) -> str:
            counts = Counter(".".join(n.split(".")[:2]) for n in names)
            return ", ".join(f"{prefix} ({n})" for prefix, n in sorted(counts.items())) or "none"

        reasons = Counter(self.skipped.values())
        skipped = "; ".join(
            f"{grouped([n for n, r in self.skipped.items() if r == reason])}: {reason}"
            for reason in sorted(reasons)
        )
        return (
            f"initialised from {self.source}\n"
            f"  loaded {len(self.loaded)} tensors: {grouped(self.loaded)}\n"
            f"  skipped {len(self.skipped)} tensors: {skipped or 'none'}\n"
            f"  left new {len(self.new)} tensors: {grouped(self.new)}"
            + (f"; also new: {also_new}" if also_new else "")
        )


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU, with a clear error if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path.resolve()}; check the path")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise InputError(f"{path} is not a Lightning checkpoint (no state_dict or hyper_parameters)")
    return checkpoint


def check_compatible(
    hparams: Mapping[str, Any],
    patch_dim: int,
    modalities: Mapping[str, Mapping[str, Any]],
    source: str,
) -> None:
    """Raise unless the checkpoint saw the same patch dimension, features and groups.

    Args:
        hparams: Hyper-parameters saved in the checkpoint.
        patch_dim: Patch-feature dimension of the current data.
        modalities: Current modality specifications (features and groups) to check.
        source: Checkpoint path, for messages.
    """
    if hparams.get("patch_dim") != patch_dim:
        raise InputError(
            f"{source} was trained on {hparams.get('patch_dim')}-d patch features but the data "
            f"have {patch_dim}-d features; use patch features from the same encoder"
        )
    saved = hparams.get("modalities", {})
    for name, spec in modalities.items():
        if name not in saved:
            raise InputError(
                f"{source} has no modality {name!r} (it has {sorted(saved)}); drop {name!r} "
                "from the model's modalities or pre-train with it"
            )
        for key in ("features", "groups"):
            if list(saved[name][key]) != list(spec[key]):
                old, new = saved[name][key], spec[key]
                first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
                raise InputError(
                    f"{source}: the {key} of modality {name!r} differ from the data's "
                    f"({len(old)} in the checkpoint, {len(new)} in the data, first difference at "
                    f"position {first}); use the same omics files, preprocessing and grouping as "
                    "in pre-training"
                )


def load_encoder(
    encoder: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    source: str,
    skip_prefixes: Mapping[str, str],
) -> LoadReport:
    """Copy the tensors under ``prefix`` of a checkpoint into ``encoder``.

    Args:
        encoder: Module to fill.
        state_dict: Checkpoint state dict.
        prefix: Prefix of the encoder's tensors in the checkpoint (``"model."``).
        source: Checkpoint path, for the report.
        skip_prefixes: Name prefix (after ``prefix``) to the reason its tensors are
            not loaded, for example ``{"decoders.": "decoders are dropped"}``.

    Returns:
        What was loaded, skipped and left new.
    """
    report = LoadReport(source)
    own = encoder.state_dict()
    chosen: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            report.skipped[key] = "not part of the encoder"
            continue
        name = key[len(prefix) :]
        reason = next((r for p, r in skip_prefixes.items() if name.startswith(p)), None)
        if reason is None and name not in own:
            reason = "not in this model"
        if reason is None and own[name].shape != value.shape:
            reason = f"shape {tuple(value.shape)} differs from {tuple(own[name].shape)}"
        if reason is not None:
            report.skipped[name] = reason
            continue
        chosen[name] = value
    encoder.load_state_dict(chosen, strict=False)
    report.loaded = sorted(chosen)
    report.new = sorted(set(own) - set(chosen))
    return report
