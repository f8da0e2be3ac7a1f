"""Per-patient labels of downstream tasks, read from the cohort table.

A target is configured in YAML by ``class_path`` under ``data.targets``. It reads its
columns, marks which patients have a usable label and gives the labels to stratify
splits on. From the training split it derives what the model needs to know about the
labels (survival time bins, class names), which the CLI links into the model.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from morpheus_pl import batch as keys
from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class TargetData:
    """Labels of all cohort patients.

    Attributes:
        tensors: Batch key to a per-patient tensor (first axis: patients).
        valid: ``(patients,)`` bool, True where the label is usable.
        strata: Per-patient values to stratify splits on, or None.
        meta: Facts about the labels found while reading: class names, and under
            ``strata`` what the strata are (``class``, ``event``, ``quantile``).
    """

    tensors: dict[str, torch.Tensor]
    valid: np.ndarray
    strata: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)


class Targets(ABC):
    """Base class of the label readers."""

    @property
    @abstractmethod
    def columns(self) -> list[str]:
        """Cohort columns read by this target."""

    @abstractmethod
    def read(self, table: pd.DataFrame, patients: Sequence[str], source: str) -> TargetData:
        """Read the labels of ``patients`` from the per-patient cohort table."""

    @abstractmethod
    def info(self, data: TargetData, train_index: np.ndarray, source: str) -> dict[str, Any]:
        """Describe the labels for the model, using the training patients only."""


def _numbers(table: pd.DataFrame, column: str, patients: Sequence[str]) -> np.ndarray:
    return pd.to_numeric(table.loc[list(patients), column], errors="coerce").to_numpy(dtype=float)


class SurvivalTargets(Targets):
    """Survival time with an explicit event flag (1 = event observed, 0 = censored).

    Args:
        time_column: Column of survival or follow-up times (any unit, used as given;
            months in the demo).
        event_column: Column of event flags (1 = event, 0 = censored).
        censorship_column: Column of censorship flags (1 = censored, 0 = event), the
            convention of some other tools. Give exactly one of ``event_column`` and
            ``censorship_column``: neither has a default, so the flag's meaning is
            never guessed.
        n_bins: Number of discrete time bins for the logistic-hazard loss. Their
            edges are quantiles of the event times of the training split.
    """

    def __init__(
        self,
        time_column: str = "os_months",
        event_column: str | None = None,
        censorship_column: str | None = None,
        n_bins: int = 5,
    ) -> None:
        # NOTE: jsonargparse 4.53 passes a command-line ``null`` for these nested
        # options as the string "None"; no real column is named so.
        event_column = None if event_column in ("None", "null") else event_column
        censorship_column = None if censorship_column in ("None", "null") else censorship_column
        if (event_column is None) == (censorship_column is None):
            raise InputError(
                "give exactly one of event_column (1 = event) and censorship_column "
                "(1 = censored); set the other to null"
            )
        if n_bins < 1:
            raise InputError(f"n_bins must be at least 1, got {n_bins}")
        self.time_column = time_column
        self.event_column = event_column
        self.censorship_column = censorship_column
        self.n_bins = n_bins

    @property
    def columns(self) -> list[str]:
        flag = self.event_column if self.event_column is not None else self.censorship_column
        return [self.time_column, flag]

    def read(self, table, patients, source):
        flag_column = self.columns[1]
        time = _numbers(table, self.time_column, patients)
        flag = _numbers(table, flag_column, patients)
        known = ~np.isnan(flag)
        bad = known & ~np.isin(flag, (0.0, 1.0))
        if bad.any():
            patient = patients[int(np.flatnonzero(bad)[0])]
            raise InputError(
                f"{source}: patient {patient!r} has {flag_column!r} = {flag[bad][0]:g}; "
                "expected 0 or 1"
            )
        # A missing (NaN) or negative time leaves the patient out; an infinite one is an
        # error, because it would make the time bins NaN.
        infinite = np.isinf(time)
        if infinite.any():
            i = int(np.flatnonzero(infinite)[0])
            raise InputError(
                f"{source}: patient {patients[i]!r} has {self.time_column!r} = {time[i]:g} "
                f"({int(infinite.sum())} patient(s) in total); survival times must be finite, "
                "so fix the value or leave the cell empty to drop the patient"
            )
        event = flag == 1 if self.event_column is not None else flag == 0
        valid = known & ~np.isnan(time) & (time >= 0)
        return TargetData(
            tensors={
                keys.TIME: torch.as_tensor(np.nan_to_num(time), dtype=torch.float32),
                keys.EVENT: torch.as_tensor(event & valid),
            },
            valid=valid,
            strata=(event & valid).astype(np.int64),
            meta={"strata": "event"},
        )

    def info(self, data, train_index, source):
        time = data.tensors[keys.TIME].numpy()[train_index]
        event = data.tensors[keys.EVENT].numpy()[train_index]
        if not event.any():
            raise InputError(
                f"{source}: the training split has no event among its {len(train_index)} "
                "patients, so survival time bins cannot be placed; use fewer folds, another "
                "seed, or a cohort with more events"
            )
        quantiles = np.arange(1, self.n_bins) / self.n_bins
        cuts = np.quantile(time[event], quantiles) if self.n_bins > 1 else np.array([])
        return {"task": "survival", "time_bins": [float(c) for c in cuts]}


class ClassTargets(Targets):
    """A categorical label.

    Args:
        label_column: Column of class labels.
        classes: Class names in the order of the model's outputs; None takes the
            sorted distinct labels of all labelled patients. With a list, a label
            outside it is an error.
    """

    def __init__(self, label_column: str = "label", classes: list[str] | None = None) -> None:
        self.label_column = label_column
        self.classes = classes

    @property
    def columns(self) -> list[str]:
        return [self.label_column]

    def class_names(self, table: pd.DataFrame, patients: Sequence[str]) -> list[str]:
        """Return the class names, in the order of the model's outputs."""
        if self.classes is not None:
            return [str(c) for c in self.classes]
        values = table.loc[list(patients), self.label_column].dropna().astype(str)
        return sorted(set(values))

    def read(self, table, patients, source):
        names = self.class_names(table, patients)
        values = table.loc[list(patients), self.label_column]
        valid = values.notna().to_numpy()
        labels = values.astype(str).to_numpy()
        unknown = valid & ~np.isin(labels, names)
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            raise InputError(
                f"{source}: patient {patients[i]!r} has {self.label_column!r} = {labels[i]!r}, "
                f"which is not one of the configured classes {names}; add it to classes"
            )
        labelled_classes = sorted(set(labels[valid]))
        if len(labelled_classes) < 2:
            raise InputError(
                f"{source}: column {self.label_column!r} has {len(labelled_classes)} class(es) "
                f"{labelled_classes} among its {int(valid.sum())} labelled patient(s), but "
                "classification needs at least two; check that the column and the cohort table "
                "are the intended ones"
            )
        index = np.array([names.index(v) if ok else -1 for v, ok in zip(labels, valid)], dtype=np.int64)
        # Stratify on the class names so that split messages can name the class.
        strata = np.where(valid, labels, "").astype(str)
        meta = {"classes": names, "strata": "class"}
        return TargetData({keys.LABEL: torch.as_tensor(index)}, valid, strata, meta)

    def info(self, data, train_index, source):
        classes = data.meta["classes"]
        counts = np.bincount(data.tensors[keys.LABEL].numpy()[train_index], minlength=len(classes))
        absent = [c for c, n in zip(classes, counts) if n == 0]
        if len(classes) - len(absent) < 2:
            trained = [c for c, n in zip(classes, counts) if n > 0]
            raise InputError(
                f"{source}: the training split contains only class(es) {trained} among its "
                f"{len(train_index)} patients (classes {classes}), so no classifier can be "
                "trained on it; use fewer folds, another seed, or put patients of other "
                "classes in the training split"
            )
        if absent:
            log.warning("classes %s have no patient in the training split", absent)
        return {
            "task": "classification",
            "classes": list(classes),
            "train_counts": [int(n) for n in counts],
        }
