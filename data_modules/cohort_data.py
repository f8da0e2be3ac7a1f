"""Assemble a cohort: patients, their slides in the store, splits and omics tensors."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from data_modules.cohort import Cohort, load_cohort, normalize_patient_id
from data_modules.feature_store import PatchFeatureStore
from data_modules.groupings import Groups, restrict
from data_modules.omics import OmicsModality, Scaling, load_matrix
from data_modules.splits import SplitStrategy
from data_modules.targets import TargetData, Targets
from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)


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
        patients: Patient ids kept (those with a slide, and a label when the task
            has labels).
        slides: Per patient, ``(slide_id, n_patches)`` of each slide.
        splits: Split name (``train``, ``val``, ``test``) to patient positions; the
            validation and test sets may coincide.
        feature_dim: Patch-feature dimension of the store.
        modalities: Modality name to its data.
        targets: Labels of the kept patients, or None without a task.
        target_info: What the model needs to know about the labels, or None.
    """

    cohort: Cohort
    patients: list[str]
    slides: list[list[tuple[str, int]]]
    splits: dict[str, np.ndarray]
    feature_dim: int
    modalities: dict[str, ModalityData] = field(default_factory=dict)
    targets: TargetData | None = None
    target_info: dict[str, Any] | None = None

    def indices(self, split: str) -> np.ndarray:
        """Positions of the patients of a split."""
        return self.splits.get(split, np.array([], dtype=np.int64))


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


def load_modality(
    name: str,
    modality: OmicsModality,
    patients: list[str],
    train_index: np.ndarray,
    scale: bool,
    normalize_ids: bool,
    saved: dict[str, Any] | None = None,
) -> ModalityData:
    """Read a modality, align it to ``patients``, then fit its groups and scaling.

    With ``saved`` (the modality's entry of a checkpoint's data state), the saved
    features, groups and scaling are reused instead of fitted.
    """
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

    if saved is not None:
        features = list(saved["features"])
        kept = var.index.get_indexer(features)
        if (kept < 0).any():
            lacking = [f for f, k in zip(features, kept) if k < 0]
            raise InputError(
                f"{modality.path} (modality {name!r}) lacks {len(lacking)} of the "
                f"{len(features)} features of the checkpoint (for example {lacking[:3]}); use "
                "the omics file the checkpoint was trained with"
            )
        groups = Groups(list(saved["group_names"]), [list(g) for g in saved["groups"]])
        aligned = aligned[:, kept]
        scaling = None
        if saved.get("scaling") is not None:
            scaling = Scaling(
                np.asarray(saved["scaling"]["mean"], dtype=np.float32),
                np.asarray(saved["scaling"]["scale"], dtype=np.float32),
            )
            aligned = scaling.transform(aligned)
    else:
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

    # A patient whose row has no measured value lacks the modality, so it gets no token
    # (rather than one built from mean values) and no loss.
    unmeasured = present & np.isnan(aligned).all(axis=1)
    if not (present & ~unmeasured).any():
        raise InputError(
            f"{modality.path} (modality {name!r}): none of its {matched} patients matched in the "
            "cohort has a measured value among the grouped features (all NaN); check the file "
            "and its grouping"
        )
    if unmeasured.any():
        log.warning(
            "%s: %d patient(s) have no measured value in %s (all NaN) and count as lacking "
            "the modality (first: %s)",
            name,
            int(unmeasured.sum()),
            modality.path,
            patients[int(np.flatnonzero(unmeasured)[0])],
        )
        present = present & ~unmeasured
    return ModalityData(
        features=features,
        groups=groups,
        values=torch.from_numpy(aligned),
        present=torch.from_numpy(present),
        scaling=scaling,
        source=str(modality.path),
    )


def restore_splits(
    saved: dict[str, list[str]], patients: list[str], source: str
) -> dict[str, np.ndarray]:
    """Map saved split memberships (patient ids) onto the current patients' positions."""
    position = {p: i for i, p in enumerate(patients)}
    splits, unknown = {}, 0
    for name, members in saved.items():
        found = [position[p] for p in members if p in position]
        unknown += len(members) - len(found)
        splits[name] = np.array(sorted(set(found)), dtype=np.int64)
    if unknown:
        log.warning(
            "%d patient(s) of the checkpoint's splits are not in %s now and are left out",
            unknown,
            source,
        )
    assigned = set().union(*(set(v.tolist()) for v in splits.values())) if splits else set()
    if len(assigned) < len(patients):
        log.warning(
            "%d patient(s) of %s were in no split of the checkpoint and are not used",
            len(patients) - len(assigned),
            source,
        )
    return splits


def keep_labelled(
    patients: list[str],
    slides: list[list[tuple[str, int]]],
    targets: TargetData,
    source: str,
) -> tuple[list[str], list[list[tuple[str, int]]], TargetData]:
    """Drop patients without a usable label, with a count in the log."""
    keep = np.flatnonzero(targets.valid)
    if len(keep) == 0:
        raise InputError(f"{source}: no patient has a usable label; check the label columns")
    if len(keep) < len(patients):
        log.warning(
            "%d of %d patient(s) have no usable label and are left out (first: %s)",
            len(patients) - len(keep),
            len(patients),
            patients[int(np.flatnonzero(~targets.valid)[0])],
        )
    subset = TargetData(
        {k: v[torch.as_tensor(keep)] for k, v in targets.tensors.items()},
        np.ones(len(keep), dtype=bool),
        None if targets.strata is None else targets.strata[keep],
        dict(targets.meta),
    )
    return [patients[i] for i in keep], [slides[i] for i in keep], subset


def prepare_cohort(
    cohort_path: str,
    store: PatchFeatureStore,
    modalities: Mapping[str, OmicsModality],
    split: SplitStrategy,
    targets: Targets | None,
    *,
    patient_column: str,
    slide_column: str | None,
    normalize_ids: bool,
    scale: bool,
    missing_slides: Literal["error", "drop"],
    expected_feature_dim: int | None,
    saved: dict[str, Any] | None = None,
    features_from: dict[str, Any] | None = None,
) -> CohortData:
    """Read and check the cohort table, the store, the labels and every omics modality.

    Args:
        saved: Data state of a checkpoint to evaluate or resume: its splits, features,
            groups, scaling and label facts are reused, so the run sees exactly the
            data the checkpoint was trained on.
        features_from: Data state of a pre-training checkpoint to fine-tune: only its
            features, groups and scaling are reused, which the pre-trained tokenizers
            expect; splits and labels are computed here.
        Other arguments: as in :class:`~data_modules.datamodule.MorpheusDataModule`.
    """
    if expected_feature_dim is not None and expected_feature_dim != store.feature_dim:
        raise InputError(
            f"the store {store.path} contains {store.feature_dim}-d patch features (encoder "
            f"{store.encoder!r}) but patch_dim is {expected_feature_dim}; use a store made with "
            "the expected encoder or change patch_dim"
        )
    for checkpoint_state in (saved, features_from):
        trained_dim = None if checkpoint_state is None else checkpoint_state.get("feature_dim")
        if trained_dim is not None and int(trained_dim) != store.feature_dim:
            source = checkpoint_state.get("source")
            raise InputError(
                f"the checkpoint {source} was trained on {trained_dim}-d patch "
                f"features but the store {store.path} contains {store.feature_dim}-d features "
                f"(encoder {store.encoder!r}); use the store the checkpoint was trained with, or "
                "one made with the same patch encoder"
            )
    constant = [*(targets.columns if targets is not None else []), *split.columns]
    cohort = load_cohort(cohort_path, patient_column, slide_column, normalize_ids, constant)
    patients, slides = match_slides(cohort, store, missing_slides)

    labels = None
    if targets is not None:
        labels = targets.read(cohort.table, patients, cohort_path)
        patients, slides, labels = keep_labelled(patients, slides, labels, cohort_path)
    if split.needs_classes and (labels is None or labels.meta.get("strata") != "class"):
        raise InputError(
            f"{type(split).__name__} samples patients per class, so it needs class labels: set "
            "data.targets to data_modules.ClassTargets (for survival, use k-fold cross-validation)"
        )

    if saved is None:
        strata = None if labels is None else labels.strata
        splits = split.assign(patients, cohort.table, strata, cohort_path)
    else:
        splits = restore_splits(saved["patients"], patients, cohort_path)
        configured, trained = sorted(modalities), sorted(saved["modalities"])
        if configured != trained:
            raise InputError(
                f"the checkpoint {saved.get('source')} was trained with modalities {trained} but "
                f"the config has {configured}; configure the same modalities in data.modalities"
            )
    state = saved or features_from or {}
    modality_state = state.get("modalities")
    if modality_state is not None:
        lacking = sorted(set(modalities) - set(modality_state))
        if lacking:
            raise InputError(
                f"the checkpoint {state.get('source')} has no data state for modalities {lacking} "
                f"(it has {sorted(modality_state)}); drop them from data.modalities or pre-train "
                "with them"
            )
    data = CohortData(cohort, patients, slides, splits, store.feature_dim, targets=labels)
    for name in ("train", "val"):
        if len(data.indices(name)) == 0:
            raise InputError(
                f"the {name} split of {cohort_path} is empty ({len(patients)} patients, split "
                f"by {type(split).__name__}); change the split settings (for example "
                "val_fraction) or assign patients to it"
            )
    train_index = data.indices("train")
    if targets is not None and labels is not None:
        if saved is not None and saved.get("target_info") is not None:
            data.target_info = saved["target_info"]
        else:
            data.target_info = targets.info(labels, train_index, cohort_path)
    for name, modality in modalities.items():
        entry = None if modality_state is None else modality_state[name]
        data.modalities[name] = load_modality(
            name, modality, patients, train_index, scale, normalize_ids, entry
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
