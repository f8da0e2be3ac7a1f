"""Split strategies: the division of patients into training, validation and test sets.

A split strategy is configured in YAML by ``class_path`` under ``data.split``. It
works on patients, never on slides, so all slides of a patient land on the same side.
The validation and test sets may be the same patients: k-fold cross-validation and
few-shot sampling evaluate on the held-out patients in both loops.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import pandas as pd

from morpheus_pl.errors import InputError

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


class SplitStrategy(ABC):
    """Base class of the split strategies."""

    #: Whether the strategy needs class labels (``data.targets`` a classification target).
    needs_classes = False

    @property
    def columns(self) -> list[str]:
        """Cohort columns the strategy reads; each must be constant per patient."""
        return []

    @abstractmethod
    def assign(
        self, patients: Sequence[str], table: pd.DataFrame, strata: np.ndarray | None, source: str
    ) -> dict[str, np.ndarray]:
        """Return the positions of the patients of each split (``train``, ``val``, ``test``).

        Args:
            patients: Patient ids.
            table: Per-patient cohort table, indexed by patient id.
            strata: Per-patient labels to stratify on (class or event flag), or None.
            source: Cohort file, for messages.
        """


class RandomSplit(SplitStrategy):
    """Seeded random split; stratified on the labels when the task has them.

    Args:
        val_fraction: Fraction of patients for validation.
        test_fraction: Fraction of patients for test.
        seed: Random seed.
    """

    def __init__(self, val_fraction: float = 0.15, test_fraction: float = 0.0, seed: int = 1999) -> None:
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise InputError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must lie in "
                "[0, 1) and sum to less than 1"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed

    def assign(self, patients, table, strata, source):
        rng = np.random.default_rng(self.seed)
        n = len(patients)
        if strata is None:
            order = rng.permutation(n)
        else:
            # Spread each stratum evenly over [0, 1), so any prefix of the order contains
            # every stratum in proportion to its size.
            key = np.empty(n)
            for label in np.unique(strata):
                members = np.flatnonzero(strata == label)
                key[members] = (rng.permutation(len(members)) + rng.random(len(members))) / len(members)
            order = np.argsort(key, kind="stable")
        n_val = round(n * self.val_fraction)
        n_test = round(n * self.test_fraction)
        return {
            "train": np.sort(order[n_val + n_test :]),
            "val": np.sort(order[:n_val]),
            "test": np.sort(order[n_val : n_val + n_test]),
        }


class ColumnSplit(SplitStrategy):
    """Split named per patient in a cohort column (``train``, ``val`` or ``test``).

    Args:
        column: Cohort column holding the split name.
    """

    def __init__(self, column: str = "split") -> None:
        self.column = column

    @property
    def columns(self) -> list[str]:
        return [self.column]

    def assign(self, patients, table, strata, source):
        if self.column not in table.columns:
            raise InputError(
                f"{source}: missing split column {self.column!r}; the table has "
                f"{list(table.columns)}"
            )
        raw = table.loc[list(patients), self.column].astype(str).str.strip().str.lower()
        unknown = sorted(set(raw) - set(SPLIT_NAMES))
        if unknown:
            patient = raw.index[raw.isin(unknown)][0]
            raise InputError(
                f"{source}: patient {patient!r} has split {unknown[0]!r} in column "
                f"{self.column!r}; expected one of {sorted(set(SPLIT_NAMES.values()))}"
            )
        names = raw.map(SPLIT_NAMES).to_numpy()
        return {s: np.flatnonzero(names == s) for s in ("train", "val", "test")}


class KFold(SplitStrategy):
    """Patient-level k-fold cross-validation; the held-out fold is validated and tested.

    Folds are stratified on the task's labels (class, or event flag for survival) when
    there are labels, and grouped by ``group_column`` when given, so that patients
    sharing a value (for example the TCGA tissue-source site) stay in one fold.

    Args:
        n_folds: Number of folds.
        fold: Held-out fold, ``0 <= fold < n_folds``.
        seed: Seed of the shuffling before the folds are cut.
        group_column: Cohort column whose values never straddle folds, or None.
    """

    def __init__(self, n_folds: int = 5, fold: int = 0, seed: int = 1999, group_column: str | None = None) -> None:
        if n_folds < 2:
            raise InputError(f"n_folds must be at least 2, got {n_folds}")
        if not 0 <= fold < n_folds:
            raise InputError(f"fold must lie in [0, {n_folds}), got {fold}")
        self.n_folds = n_folds
        self.fold = fold
        self.seed = seed
        self.group_column = group_column

    @property
    def columns(self) -> list[str]:
        return [] if self.group_column is None else [self.group_column]

    def fold_of(self, patients, table, strata, source) -> np.ndarray:
        """Return the fold number of every patient."""
        from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold
        from sklearn.model_selection import KFold as PlainKFold

        n = len(patients)
        if n < self.n_folds:
            raise InputError(f"{source}: {n} patients cannot fill {self.n_folds} folds")
        groups = None
        if self.group_column is not None:
            if self.group_column not in table.columns:
                raise InputError(
                    f"{source}: missing group column {self.group_column!r}; the table has "
                    f"{list(table.columns)}"
                )
            groups = table.loc[list(patients), self.group_column].astype(str).to_numpy()
        if strata is not None and groups is not None:
            splitter = StratifiedGroupKFold(self.n_folds, shuffle=True, random_state=self.seed)
        elif strata is not None:
            splitter = StratifiedKFold(self.n_folds, shuffle=True, random_state=self.seed)
        elif groups is not None:
            splitter = GroupKFold(self.n_folds, shuffle=True, random_state=self.seed)
        else:
            splitter = PlainKFold(self.n_folds, shuffle=True, random_state=self.seed)
        folds = np.empty(n, dtype=np.int64)
        labels = strata if strata is not None else np.zeros(n)
        for k, (_, held_out) in enumerate(splitter.split(np.zeros(n), labels, groups)):
            folds[held_out] = k
        return folds

    def assign(self, patients, table, strata, source):
        folds = self.fold_of(patients, table, strata, source)
        held_out = np.flatnonzero(folds == self.fold)
        return {"train": np.flatnonzero(folds != self.fold), "val": held_out, "test": held_out}


class FewShot(SplitStrategy):
    """``k`` labelled patients per class for training; every other patient is evaluated.

    Sampling ``s`` draws with seed ``seed + s``, so samplings differ and repeat exactly.

    Args:
        k: Training patients per class.
        sampling: Index of the sampling.
        seed: Base seed.
    """

    needs_classes = True

    def __init__(self, k: int = 5, sampling: int = 0, seed: int = 1999) -> None:
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        self.k = k
        self.sampling = sampling
        self.seed = seed

    def assign(self, patients, table, strata, source):
        rng = np.random.default_rng(self.seed + self.sampling)
        train = []
        for label in np.unique(strata):
            members = np.flatnonzero(strata == label)
            if len(members) <= self.k:
                raise InputError(
                    f"{source}: class '{label}' has {len(members)} labelled patient(s), but "
                    f"{self.k}-shot training needs more than {self.k} to leave some for evaluation; "
                    "lower k"
                )
            train.extend(rng.choice(members, size=self.k, replace=False).tolist())
        train_index = np.sort(np.array(train))
        rest = np.setdiff1d(np.arange(len(patients)), train_index)
        return {"train": train_index, "val": rest, "test": rest}
