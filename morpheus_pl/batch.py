"""Keys of the batches that the DataModules hand to the LightningModules.

A batch is a plain ``dict`` so that Lightning can move it between devices. Every
producer and consumer spells the keys through these constants.
"""

from __future__ import annotations

from typing import TypedDict

import torch

#: Patch features, ``(B, N, D)``, float16 or float32.
PATCHES = "patches"
#: ``(B, N)`` bool, True for real patches and False for padding.
PATCH_MASK = "patch_mask"
#: Modality name to ``(B, F_m)`` float32 omics values; NaN marks a missing value.
OMICS = "omics"
#: Modality name to ``(B,)`` bool, False when the patient lacks that modality.
OMICS_PRESENT = "omics_present"
#: Patient ids, a list of ``B`` strings.
PATIENT_ID = "patient_id"
#: ``(B,)`` long, the patient's position in the prepared cohort; metrics use it to
#: count each patient once when a distributed sampler repeats samples.
PATIENT_INDEX = "patient_index"
#: ``(B,)`` float32 survival or follow-up time.
TIME = "time"
#: ``(B,)`` bool, True when the event was observed (False: censored).
EVENT = "event"
#: ``(B,)`` long class index.
LABEL = "label"


class Batch(TypedDict, total=False):
    """Type of a batch; label keys are present only for downstream tasks."""

    patches: torch.Tensor
    patch_mask: torch.Tensor
    omics: dict[str, torch.Tensor]
    omics_present: dict[str, torch.Tensor]
    patient_id: list[str]
    patient_index: torch.Tensor
    time: torch.Tensor
    event: torch.Tensor
    label: torch.Tensor
