"""Omics modalities stored as AnnData: reading, id matching and scaling."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from data_modules.cohort import normalize_patient_id
from data_modules.groupings import Chunks, TokenGrouping
from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class OmicsModality:
    """One omics modality of a cohort.

    Args:
        path: AnnData file (``.h5ad`` or ``.zarr``): ``obs_names`` are patient (or
            TCGA sample) ids, ``var_names`` feature ids, ``X`` the values with NaN for
            missing ones.
        grouping: How the features become tokens.
        layer: Read this layer instead of ``X``.
    """

    path: str
    grouping: TokenGrouping = Chunks()
    layer: str | None = None


def read_anndata(path: str | os.PathLike[str]) -> ad.AnnData:
    """Read an ``.h5ad`` file or ``.zarr`` directory into memory."""
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"omics file not found: {path.resolve()}; check the path (relative paths start "
            "from the current directory)"
        )
    try:
        if path.suffix == ".zarr" or path.is_dir():
            return ad.read_zarr(path)
        return ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as error:
        raise InputError(f"{path}: cannot read it as AnnData ({error}); check the file") from error


def load_matrix(
    name: str, modality: OmicsModality, normalize_ids: bool = True
) -> tuple[pd.DataFrame, np.ndarray, pd.Index]:
    """Read a modality and check it.

    Returns:
        ``var`` (indexed by feature id), the ``(patients, features)`` float32 values
        and the patient ids (normalised when ``normalize_ids``).

    Raises:
        InputError: Duplicated patient or feature ids, non-numeric or infinite values.
    """
    where = f"{modality.path} (modality {name!r})"
    if not Path(modality.path).exists():
        raise InputError(
            f"omics file of modality {name!r} not found: {Path(modality.path).resolve()}; check "
            "the path (relative paths start from the current directory)"
        )
    adata = read_anndata(modality.path)
    if modality.layer is not None and modality.layer not in adata.layers:
        raise InputError(
            f"{where}: layer {modality.layer!r} not found; available: {list(adata.layers)}"
        )
    matrix = adata.layers[modality.layer] if modality.layer else adata.X
    if matrix is None:
        raise InputError(f"{where}: X is empty; store the values in X or name a layer")
    if sparse.issparse(matrix):
        matrix = matrix.toarray()
    matrix = np.asarray(matrix)
    if not np.issubdtype(matrix.dtype, np.number):
        raise InputError(f"{where}: values must be numeric, got dtype {matrix.dtype}")
    values = matrix.astype(np.float32, copy=False)

    var_names = pd.Index(adata.var_names.astype(str))
    if var_names.has_duplicates:
        dup = var_names[var_names.duplicated()].unique()
        raise InputError(
            f"{where}: {len(dup)} duplicated feature id(s), for example {list(dup[:3])}; "
            "make var_names unique"
        )
    raw_ids = pd.Index(adata.obs_names.astype(str))
    ids = pd.Index([normalize_patient_id(i) for i in raw_ids]) if normalize_ids else raw_ids
    if ids.has_duplicates:
        dup = ids[ids.duplicated()][0]
        rows = list(raw_ids[ids == dup])
        raise InputError(
            f"{where}: duplicated patient id {dup!r} (obs_names {rows}); keep one row per "
            "patient, for example the primary-tumour sample (-01)"
        )
    infinite = np.isinf(values)
    if infinite.any():
        row, col = np.argwhere(infinite)[0]
        raise InputError(
            f"{where}: infinite value for patient {raw_ids[row]!r}, feature {var_names[col]!r} "
            f"({int(infinite.sum())} in total); replace them with NaN (missing) or finite values"
        )
    var = adata.var.copy()
    var.index = var_names
    return var, values, ids


@dataclass
class Scaling:
    """Per-feature centring and scaling fitted on the training split."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, modality: str) -> Scaling:
        """Fit on ``(patients, features)`` training values, ignoring NaN.

        A feature that is constant in training gets scale 1, so it becomes 0 rather
        than NaN; one never measured in training gets mean 0 and scale 1. Both are
        counted in a warning.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0)
            std = np.nanstd(values, axis=0)
        unmeasured = np.isnan(mean)
        constant = ~unmeasured & ~(std > 0)
        if unmeasured.any() or constant.any():
            log.warning(
                "%s: %d feature(s) constant and %d never measured in the training split; "
                "they are scaled to 0",
                modality,
                int(constant.sum()),
                int(unmeasured.sum()),
            )
        mean = np.where(unmeasured, 0.0, mean)
        scale = np.where(std > 0, std, 1.0)
        return cls(mean.astype(np.float32), scale.astype(np.float32))

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Centre and scale ``(patients, features)`` values; NaN stays NaN."""
        return ((values - self.mean) / self.scale).astype(np.float32)
