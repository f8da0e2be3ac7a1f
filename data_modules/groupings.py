"""Token groupings: how a modality's features are cut into groups, one token each.

A grouping is configured in YAML by ``class_path`` and fitted once per run on the
modality's feature table (``var``) and, for data-driven groupings, on the values of
the training split.

Overlapping groups (gene sets share genes) let a masked feature leak through another
visible token that contains it, which makes reconstruction easier than it looks.
:class:`GeneSets` offers ``exclusive=True`` to keep each feature in one group only.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class Groups:
    """Fitted groups of one modality.

    Attributes:
        names: Group names, one per token.
        members: For each group, indices into the modality's feature list.
        n_unmatched: Entries of the grouping source that matched no feature (for
            example genes of a gene set absent from the data).
    """

    names: list[str]
    members: list[list[int]]
    n_unmatched: int = 0

    def used_features(self) -> np.ndarray:
        """Sorted indices of the features that belong to at least one group."""
        return np.unique(np.concatenate([np.asarray(m, dtype=np.int64) for m in self.members]))

    def reindexed(self, kept: np.ndarray) -> Groups:
        """Return the groups with member indices renumbered after keeping ``kept`` features."""
        position = {int(old): new for new, old in enumerate(kept)}
        members = [[position[i] for i in m] for m in self.members]
        return Groups(self.names, members, self.n_unmatched)


class TokenGrouping(ABC):
    """Base class of the groupings."""

    @abstractmethod
    def fit(self, var: pd.DataFrame, train_values: np.ndarray, modality: str) -> Groups:
        """Return the groups of the features in ``var``.

        Args:
            var: Feature table indexed by feature id, in the modality's order.
            train_values: ``(training patients, features)`` values (NaN if missing).
            modality: Modality name for messages.
        """

    def __call__(self, var: pd.DataFrame, train_values: np.ndarray, modality: str) -> Groups:
        """Fit, drop empty groups with a warning, and log the group sizes."""
        groups = self.fit(var, train_values, modality)
        keep = [i for i, m in enumerate(groups.members) if len(m) > 0]
        if len(keep) < len(groups.members):
            empty = [groups.names[i] for i in range(len(groups.members)) if i not in set(keep)]
            log.warning(
                "%s: %d empty group(s) dropped (%s)",
                modality,
                len(empty),
                ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""),
            )
        groups = Groups(
            [groups.names[i] for i in keep], [groups.members[i] for i in keep], groups.n_unmatched
        )
        if not groups.members:
            raise InputError(f"{modality}: {type(self).__name__} produced no non-empty group")
        sizes = np.array([len(m) for m in groups.members])
        log.info(
            "%s: %d tokens from %s over %d of %d features; group sizes min %d, median %d, max %d",
            modality,
            len(sizes),
            type(self).__name__,
            len(groups.used_features()),
            len(var),
            sizes.min(),
            int(np.median(sizes)),
            sizes.max(),
        )
        return groups


def bundled_hallmark_gmt() -> str:
    """Path of the MSigDB Hallmark gene sets shipped with the package (CC BY 4.0)."""
    return str(resources.files("data_modules") / "resources" / "hallmark_gene_sets.gmt")


def read_gmt(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read a GMT file: one gene set per line, ``name<TAB>description<TAB>gene...``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GMT file not found: {path}")
    sets: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 3:
            raise InputError(
                f"{path}, line {number}: expected 'name<TAB>description<TAB>genes...', got "
                f"{len(fields)} tab-separated field(s)"
            )
        genes = [g.strip() for g in fields[2:] if g.strip()]
        sets[fields[0]] = list(dict.fromkeys(genes))
    if not sets:
        raise InputError(f"{path}: no gene set found")
    return sets


class GeneSets(TokenGrouping):
    """One token per gene set of a GMT file (for RNA: pathways).

    Args:
        gmt: GMT file; None for the bundled MSigDB Hallmark collection (50 sets,
            Liberzon et al., Cell Systems 2015, CC BY 4.0).
        symbol_column: ``var`` column holding gene symbols; None to match
            ``var_names`` directly.
        exclusive: Keep each gene only in the first set (in file order) that contains
            it, so no masked gene is visible through another token.
        min_size: Drop sets with fewer matched genes than this.
    """

    def __init__(
        self,
        gmt: str | None = None,
        symbol_column: str | None = None,
        exclusive: bool = False,
        min_size: int = 1,
    ) -> None:
        self.gmt = gmt
        self.symbol_column = symbol_column
        self.exclusive = exclusive
        self.min_size = min_size

    def fit(self, var: pd.DataFrame, train_values: np.ndarray, modality: str) -> Groups:
        path = self.gmt or bundled_hallmark_gmt()
        sets = read_gmt(path)
        if self.symbol_column is not None:
            if self.symbol_column not in var.columns:
                raise InputError(
                    f"{modality}: var has no column {self.symbol_column!r}; "
                    f"available: {list(var.columns)}"
                )
            symbols = var[self.symbol_column].astype(str).to_numpy()
        else:
            symbols = var.index.astype(str).to_numpy()
        lookup: dict[str, list[int]] = {}
        for i, s in enumerate(symbols):
            lookup.setdefault(s.upper(), []).append(i)

        names, members, unmatched, taken = [], [], 0, set()
        for name, genes in sets.items():
            found: list[int] = []
            for gene in genes:
                hits = lookup.get(gene.upper())
                if hits is None:
                    unmatched += 1
                    continue
                for i in hits:
                    if self.exclusive and i in taken:
                        continue
                    found.append(i)
                    taken.add(i)
            if 0 < len(found) < self.min_size:
                log.warning(
                    "%s: gene set %s matched %d gene(s), fewer than min_size %d; dropped",
                    modality, name, len(found), self.min_size,
                )
                found = []
            names.append(name)
            members.append(found)
        if not any(members):
            raise InputError(
                f"{path}: no gene of its {len(sets)} set(s) matches a feature of modality "
                f"{modality!r} (features look like {list(symbols[:3])}, genes like "
                f"{next(iter(sets.values()))[:3]}); use gene symbols as var_names or set "
                "symbol_column to the var column that holds them"
            )
        log.info("%s: %d gene-set memberships did not match a feature", modality, unmatched)
        return Groups(names, members, unmatched)


class VarColumn(TokenGrouping):
    """One token per distinct value of a ``var`` column (in order of first appearance).

    Features with a missing value in the column belong to no group.
    """

    def __init__(self, column: str = "group") -> None:
        self.column = column

    def fit(self, var: pd.DataFrame, train_values: np.ndarray, modality: str) -> Groups:
        if self.column not in var.columns:
            raise InputError(
                f"{modality}: var has no column {self.column!r}; available: {list(var.columns)}"
            )
        labels = var[self.column].reset_index(drop=True)
        names, members = [], []
        for label, rows in labels.groupby(labels, sort=False, dropna=True).groups.items():
            names.append(str(label))
            members.append(sorted(int(r) for r in rows))
        return Groups(names, members, int(labels.isna().sum()))


_CHROM_ORDER = {str(i): i for i in range(1, 23)} | {"X": 23, "Y": 24, "M": 25, "MT": 25}


def chromosome_rank(value: object) -> int:
    """Rank a chromosome name (``chr1`` < ... < ``chr22`` < ``X`` < ``Y`` < ``M``).

    Unknown names rank after all known ones.
    """
    name = re.sub(r"^chr", "", str(value), flags=re.IGNORECASE).upper()
    return _CHROM_ORDER.get(name, 100)


def _genomic_order(var: pd.DataFrame, chrom: str, start: str, modality: str) -> tuple[np.ndarray, int]:
    """Return the positions of the placed features in genomic order, and the unplaced count.

    A feature without a chromosome or a numeric start position is unplaced and left out.
    """
    for column in (chrom, start):
        if column not in var.columns:
            raise InputError(
                f"{modality}: var has no column {column!r} needed for genomic order; "
                f"available: {list(var.columns)}"
            )
    ranks = var[chrom].map(chromosome_rank).to_numpy()
    starts = pd.to_numeric(var[start], errors="coerce").to_numpy(dtype=float)
    placed = np.flatnonzero(var[chrom].notna().to_numpy() & np.isfinite(starts))
    order = placed[np.lexsort((starts[placed], ranks[placed]))]
    unplaced = len(var) - len(placed)
    if unplaced:
        log.warning(
            "%s: %d feature(s) without %s/%s are left out of the genomic grouping",
            modality, unplaced, chrom, start,
        )
    return order, unplaced


class Chunks(TokenGrouping):
    """Contiguous chunks of nearly equal size along a fixed feature order.

    Args:
        n_groups: Number of chunks.
        order: ``"var"`` keeps the order of ``var``; ``"genomic"`` sorts by the
            ``chrom`` and ``start`` columns (chromosomes in natural order); ``"name"``
            sorts by feature id.
        chrom_column: Chromosome column for ``order="genomic"``.
        start_column: Start-position column for ``order="genomic"``.
    """

    def __init__(
        self,
        n_groups: int = 50,
        order: str = "var",
        chrom_column: str = "chrom",
        start_column: str = "start",
    ) -> None:
        if order not in ("var", "genomic", "name"):
            raise ValueError(f"order must be 'var', 'genomic' or 'name', got {order!r}")
        self.n_groups = n_groups
        self.order = order
        self.chrom_column = chrom_column
        self.start_column = start_column

    def fit(self, var: pd.DataFrame, train_values: np.ndarray, modality: str) -> Groups:
        unplaced = 0
        if self.order == "genomic":
            order, unplaced = _genomic_order(var, self.chrom_column, self.start_column, modality)
        elif self.order == "name":
            order = np.argsort(var.index.astype(str).to_numpy(), kind="stable")
        else:
            order = np.arange(len(var))
        if len(order) < self.n_groups:
            raise InputError(
                f"{modality}: {len(order)} features cannot fill {self.n_groups} chunks; "
                "lower n_groups"
            )
        pieces = np.array_split(order, self.n_groups)
        names = [f"chunk_{i:03d}" for i in range(len(pieces))]
        return Groups(names, [p.tolist() for p in pieces], unplaced)


class GenomicBins(TokenGrouping):
    """One token per fixed-width bin along each chromosome.

    Args:
        bin_size: Bin width in base pairs.
        chrom_column: Chromosome column of ``var``.
        start_column: Start-position column of ``var``.
    """

    def __init__(
        self, bin_size: int = 10_000_000, chrom_column: str = "chrom", start_column: str = "start"
    ) -> None:
        self.bin_size = bin_size
        self.chrom_column = chrom_column
        self.start_column = start_column

    def fit(self, var: pd.DataFrame, train_values: np.ndarray, modality: str) -> Groups:
        order, unplaced = _genomic_order(var, self.chrom_column, self.start_column, modality)
        starts = pd.to_numeric(var[self.start_column], errors="coerce").to_numpy()
        chroms = var[self.chrom_column].astype(str).to_numpy()
        names: list[str] = []
        members: list[list[int]] = []
        for i in order:
            name = f"{chroms[i]}:{int(starts[i] // self.bin_size) * self.bin_size}"
            if not names or names[-1] != name:
                names.append(name)
                members.append([])
            members[-1].append(int(i))
        return Groups(names, members, unplaced)


class CorrelationClusters(TokenGrouping):
    """Clusters of correlated features, fitted on the training split only.

    Each feature is standardised over the training patients (missing values set to
    the mean). The squared Euclidean distance between two features is then
    ``2 * n * (1 - r)`` with ``r`` their Pearson correlation, so k-means groups
    correlated features.

    Args:
        n_groups: Number of clusters.
        seed: Seed of the k-means initialisation.
    """

    def __init__(self, n_groups: int = 50, seed: int = 1999) -> None:
        self.n_groups = n_groups
        self.seed = seed

    def fit(self, var: pd.DataFrame, train_values: np.ndarray, modality: str) -> Groups:
        from sklearn.cluster import KMeans

        if len(var) < self.n_groups:
            raise InputError(
                f"{modality}: {len(var)} features cannot form {self.n_groups} clusters; "
                "lower n_groups"
            )
        if train_values.shape[0] < 2:
            raise InputError(f"{modality}: clustering needs at least 2 training patients")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(train_values, axis=0)
        centred = np.nan_to_num(train_values - mean)
        norms = np.linalg.norm(centred, axis=0)
        points = (centred / np.where(norms > 0, norms, 1.0)).T
        labels = KMeans(self.n_groups, n_init=4, random_state=self.seed).fit_predict(points)
        # Number clusters by their first feature so the order is stable across runs.
        first = {lab: np.flatnonzero(labels == lab)[0] for lab in np.unique(labels)}
        ordered = sorted(first, key=first.get)
        members = [np.flatnonzero(labels == lab).tolist() for lab in ordered]
        return Groups([f"cluster_{i:03d}" for i in range(len(members))], members)


def restrict(groups: Groups, feature_names: Sequence[str]) -> tuple[Groups, list[str], np.ndarray]:
    """Keep only features that belong to a group.

    Returns the renumbered groups, the kept feature names and their original indices.
    """
    kept = groups.used_features()
    return groups.reindexed(kept), [feature_names[i] for i in kept], kept
