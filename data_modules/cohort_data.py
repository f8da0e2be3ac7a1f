"""Assemble a cohort: patients, their slides in the store, splits and omics tensors."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from data_modules.cohort import Cohort, load_cohort, normalize_patient_id, random_split
from data_modules.feature_store import PatchFeatureStore
from data_modules.groupings import Groups, restrict
from data_modules.omics import OmicsModality, Scaling, load_matrix
from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class ModalityData:
    """One modality aligned to the cohort's patients.

    Attributes:
        features: Feature ids in the order of the value columns.
        groups: Token groups over those features.
        values: ``(patients, features)`` float32 values, scaled if requested; NaN for
            missing values and for every value of a patient without the modality.
        present: ``(patients,)`` bool, whether the patient has this modality.
        scaling: Statistics fitted on the training split, or None without scaling.
        source: File the modality came from.
    """

    features: list[str]
    groups: Groups
    values: torch.Tensor
    present: torch.Tensor
    scaling: Scaling | None
    source: str

    def spec(self, train_index: np.ndarray) -> dict[str, Any]:
        """Describe the modality for the model: features, groups and training means."""
        train = self.values[torch.as_tensor(train_index)]
        mean = torch.nanmean(train, dim=0).nan_to_num(0.0)
        return {
            "features": list(self.features),
            "group_names": list(self.groups.names),
            "groups": [list(m) for m in self.groups.members],
            "train_mean": mean.tolist(),
        }


@dataclass
class CohortData:
    """Everything a DataModule needs, prepared once per process.

    Attributes:
        cohort: The cohort table.
        patients: Patient ids kept (those with at least one slide).
        slides: Per patient, ``(slide_id, n_patches)`` of each slide.
        split: Per patient, ``train``, ``val`` or ``test``.
        modalities: Modality name to its data.
        feature_dim: Patch-feature dimension of the store.
    """

    cohort: Cohort
    patients: list[str]
    slides: list[list[tuple[str, int]]]
    split: list[str]
    modalities: dict[str, ModalityData] = field(default_factory=dict)
    feature_dim: int = 0

    def indices(self, split: str) -> np.ndarray:
        """Positions of the patients of a split."""
        return np.flatnonzero(np.asarray(self.split) == split)


def match_slides(
    cohort: Cohort,
    store: PatchFeatureStore,
    missing_slides: Literal["error", "drop"],
) -> tuple[list[str], list[list[tuple[str, int]]]]:
    """Find each patient's slides in the store and check them."""
    in_store = {s.slide_id: s for s in store.slides()}
    by_patient: dict[str, list[str]] = {}
    for info in in_store.values():
        by_patient.setdefault(normalize_patient_id(info.patient_id), []).append(info.slide_id)

    patients, slides, lacking = [], [], []
    for patient in cohort.patients:
        names = cohort.slides.get(patient) or sorted(by_patient.get(patient, []))
        unknown = [s for s in names if s not in in_store]
        if unknown:
            if missing_slides == "error":
                raise InputError(
                    f"{cohort.source}: slide {unknown[0]!r} of patient {patient!r} is not in the "
                    f"store {store.path} ({len(unknown)} missing for this patient); convert it, fix "
                    "the slide id, or set missing_slides: drop"
                )
            names = [s for s in names if s in in_store]
        for name in names:
            info = in_store[name]
            if normalize_patient_id(info.patient_id) != patient:
                raise InputError(
                    f"slide {name!r} belongs to patient {info.patient_id!r} in {store.path} but to "
                    f"{patient!r} in {cohort.source}; fix the cohort table or the store"
                )
            if info.n_patches == 0:
                raise InputError(
                    f"slide {name!r} of patient {patient!r} has 0 patches in {store.path}; "
                    "remove it from the cohort table or re-extract it"
                )
        if not names:
            lacking.append(patient)
            continue
        patients.append(patient)
        slides.append([(s, in_store[s].n_patches) for s in names])

    if lacking:
        if missing_slides == "error":
            raise InputError(
                f"{len(lacking)} patient(s) of {cohort.source} have no slide in {store.path} "
                f"(first: {lacking[0]!r}); convert their slides, remove them from the table, "
                "or set missing_slides: drop"
            )
        log.warning("%d patient(s) without a slide dropped (first: %s)", len(lacking), lacking[0])
    if not patients:
        raise InputError(f"no patient of {cohort.source} has a slide in {store.path}")
    return patients, slides


def assign_splits(
    cohort: Cohort,
    patients: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """Split names per patient, from the table's split column or at random."""
    if cohort.split is None:
        chosen = random_split(patients, val_fraction, test_fraction, seed)
        return [chosen[p] for p in patients]
    names = []
    for p in patients:
        raw = cohort.split[p].strip().lower()
        if raw not in SPLIT_NAMES:
            raise InputError(
                f"{cohort.source}: patient {p!r} has split {cohort.split[p]!r}; expected one of "
                f"{sorted(set(SPLIT_NAMES.values()))}"
            )
        names.append(SPLIT_NAMES[raw])
    return names


def load_modality(
    name: str,
    modality: OmicsModality,
    patients: list[str],
    train_index: np.ndarray,
    scale: bool,
    normalize_ids: bool,
) -> ModalityData:
    """Read a modality, align it to ``patients``, fit its groups and scaling."""
    var, values, ids = load_matrix(name, modality, normalize_ids)
    position = pd.Series(np.arange(len(ids)), index=ids)
    rows = position.reindex(patients).to_numpy()
    present = ~np.isnan(rows)
    matched = int(present.sum())
    log.info(
        "%s: %d of %d patients matched in %s; %d id(s) of the file are not in the cohort",
        name,
        matched,
        len(patients),
        modality.path,
        len(ids) - matched,
    )
    if matched == 0:
        raise InputError(
            f"{modality.path} (modality {name!r}): none of its {len(ids)} ids (for example "
            f"{list(ids[:3])}) matches a cohort patient (for example {patients[:3]}); check the "
            "ids or the patient column"
        )
    aligned = np.full((len(patients), values.shape[1]), np.nan, dtype=np.float32)
    aligned[present] = values[rows[present].astype(np.int64)]

    train_rows = train_index[present[train_index]]
    if len(train_rows) == 0:
        raise InputError(
            f"{modality.path} (modality {name!r}): no training patient has this modality; "
            "the groups and scaling are fitted on the training split"
        )
    groups = modality.grouping(var, aligned[train_rows], name)
    groups, features, kept = restrict(groups, list(var.index))
    aligned = aligned[:, kept]

    scaling = None
    if scale:
        scaling = Scaling.fit(aligned[train_rows], name)
        aligned = scaling.transform(aligned)
    return ModalityData(
        features=features,
        groups=groups,
        values=torch.from_numpy(aligned),
        present=torch.from_numpy(present),
        scaling=scaling,
        source=str(modality.path),
    )


def prepare_cohort(
    cohort_path: str,
    store: PatchFeatureStore,
    modalities: Mapping[str, OmicsModality],
    *,
    patient_column: str,
    slide_column: str | None,
    split_column: str | None,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    normalize_ids: bool,
    scale: bool,
    missing_slides: Literal["error", "drop"],
    expected_feature_dim: int | None,
) -> CohortData:
    """Read and check the cohort table, the store and every omics modality."""
    if expected_feature_dim is not None and expected_feature_dim != store.feature_dim:
        raise InputError(
            f"the store {store.path} contains {store.feature_dim}-d patch features (encoder "
            f"{store.encoder!r}) but patch_dim is {expected_feature_dim}; use a store made with "
            "the expected encoder or change patch_dim"
        )
    cohort = load_cohort(cohort_path, patient_column, slide_column, split_column, normalize_ids)
    patients, slides = match_slides(cohort, store, missing_slides)
    split = assign_splits(cohort, patients, val_fraction, test_fraction, split_seed)
    data = CohortData(cohort, patients, slides, split, feature_dim=store.feature_dim)

    for name in ("train", "val"):
        if len(data.indices(name)) == 0:
            raise InputError(
                f"the {name} split of {cohort_path} is empty ({len(patients)} patients); "
                + (
                    f"assign patients to '{name}' in column {split_column!r}"
                    if split_column
                    else "raise val_fraction or add patients"
                )
            )
    train_index = data.indices("train")
    for name, modality in modalities.items():
        data.modalities[name] = load_modality(
            name, modality, patients, train_index, scale, normalize_ids
        )
    log.info(
        "cohort %s: %d patients (train %d, val %d, test %d), %d slides, %d-d patch features",
        cohort_path,
        len(patients),
        len(train_index),
        len(data.indices("val")),
        len(data.indices("test")),
        sum(len(s) for s in slides),
        store.feature_dim,
    )
    return data
