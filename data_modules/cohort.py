"""Cohort tables: patients, their slides, splits and labels."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)

# TCGA barcodes: TCGA-<tissue source site>-<participant>[-<sample>...]. The first
# three fields identify the patient.
_TCGA = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})([-.].*)?$", re.IGNORECASE)


def normalize_patient_id(identifier: str) -> str:
    """Reduce a TCGA patient, sample or slide barcode to the patient (``TCGA-XX-XXXX``).

    Ids that are not TCGA barcodes are returned stripped but otherwise unchanged.
    """
    text = str(identifier).strip()
    match = _TCGA.match(text)
    return match.group(1).upper() if match else text


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV, TSV or parquet table; the format comes from the file extension."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"table not found: {path.resolve()}; check the path (relative paths start from "
            "the current directory)"
        )
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if suffixes.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[""])
    if suffixes.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    raise InputError(
        f"{path}: unknown table format {path.suffix!r}; use .csv, .tsv or .parquet"
    )


@dataclass
class Cohort:
    """Patients of a cohort with their slides, splits and per-patient columns.

    Attributes:
        patients: Patient ids in table order, each once.
        slides: Patient id to its slide ids (empty when the table names none).
        table: One row per patient (index: patient id) with the other columns of the
            table. Where a patient's rows differ, the first row's value is kept.
        source: Path of the table.
    """

    patients: list[str]
    slides: dict[str, list[str]]
    table: pd.DataFrame
    source: str


def load_cohort(
    path: str | os.PathLike[str],
    patient_column: str = "patient_id",
    slide_column: str | None = "slide_id",
    normalize_ids: bool = True,
    constant_columns: Sequence[str] = (),
) -> Cohort:
    """Read a cohort table with one row per slide or per patient.

    Args:
        path: CSV, TSV or parquet file.
        patient_column: Column of patient ids.
        slide_column: Column of slide ids; None when slides come from the store.
        normalize_ids: Reduce TCGA barcodes to patient ids (``TCGA-XX-XXXX``).
        constant_columns: Per-patient columns (split, labels, groups) that must have
            the same value in all rows of a patient.

    Raises:
        InputError: A named column is missing, an id is empty, a slide belongs to two
            patients or appears twice, or a constant column differs between a patient's
            rows.
    """
    table = read_table(path)
    needed = [c for c in (patient_column, slide_column, *constant_columns) if c is not None]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {missing}; the table has {list(table.columns)}. "
            "Set the column names in the config to the table's names"
        )
    if table.empty:
        raise InputError(f"{path}: the cohort table has no rows")

    ids = table[patient_column].astype("string").str.strip()
    if ids.isna().any() or (ids == "").any():
        row = int(np.flatnonzero(ids.isna().to_numpy() | (ids == "").to_numpy())[0])
        raise InputError(f"{path}: empty {patient_column!r} at data row {row + 1}; fill it or drop the row")
    ids = ids.map(normalize_patient_id) if normalize_ids else ids
    table = table.assign(**{patient_column: ids.astype(str)})

    slides: dict[str, list[str]] = {}
    if slide_column is not None:
        slide_ids = table[slide_column].astype("string").str.strip()
        if slide_ids.isna().any() or (slide_ids == "").any():
            raise InputError(f"{path}: empty {slide_column!r} values; fill them or drop those rows")
        table = table.assign(**{slide_column: slide_ids.astype(str)})
        repeated = table[table.duplicated([slide_column], keep=False)]
        if not repeated.empty:
            slide = repeated[slide_column].iloc[0]
            owners = sorted(set(repeated.loc[repeated[slide_column] == slide, patient_column]))
            raise InputError(
                f"{path}: duplicated slide id {slide!r} (rows for patient(s) {owners}); "
                "each slide may appear once, so remove the repeated rows"
            )
        for patient, slide in zip(table[patient_column], table[slide_column]):
            slides.setdefault(patient, []).append(slide)
    elif table[patient_column].duplicated().any():
        patient = table.loc[table[patient_column].duplicated(), patient_column].iloc[0]
        raise InputError(
            f"{path}: duplicated patient id {patient!r}; without a slide column the table "
            "needs one row per patient. Remove the repeats or set slide_column"
        )

    for column in constant_columns:
        per_patient = table.groupby(patient_column, sort=False)[column].nunique(dropna=False)
        varying = per_patient[per_patient > 1]
        if not varying.empty:
            raise InputError(
                f"{path}: patient {varying.index[0]!r} has rows with different {column!r} "
                "values; all rows (slides) of a patient must agree on it"
            )

    per_patient_table = table.drop_duplicates(patient_column).set_index(patient_column)
    patients = list(per_patient_table.index)
    for p in patients:
        slides.setdefault(p, [])
    return Cohort(patients, slides, per_patient_table, str(path))

