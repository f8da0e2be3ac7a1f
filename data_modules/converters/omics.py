"""Convert omics matrices as the public portals ship them into AnnData files.

The input is one delimited text matrix per modality (optionally gzipped). The first
column contains ids and each further column one sample (``features-by-samples``, as UCSC
Xena ships gene expression, DNA methylation beta values and gene-level copy number), or
the transpose (``samples-by-features``). The conversion:

1. reduces sample barcodes to patients (``TCGA-XX-XXXX``), optionally drops sample
   types and patients outside a cohort table, and keeps one row per patient by an
   explicit rule (:data:`DUPLICATE_RULES`);
2. applies a recipe (:data:`RECIPES`);
3. optionally keeps the most variable features (:func:`select_top_variable`);
4. optionally adds genome coordinates (``var["chrom"]``, ``var["start"]``) and gene
   symbols from an annotation table;
5. writes the ``.h5ad`` through a temporary file and a rename, so a killed run never
   leaves a partial file under the output name.

Every step and its parameters are recorded in ``adata.uns["preprocessing"]``:
``steps`` lists the steps that changed values or features in order, and each has an
entry of the same name with its parameters. ``samples`` contains the sample report and
``annotation`` the annotation report.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from data_modules.cohort import normalize_patient_id, read_table
from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)

Orientation = Literal["features-by-samples", "samples-by-features"]
ORIENTATIONS = ("features-by-samples", "samples-by-features")

#: Recipe name -> what it does.
RECIPES = {
    "none": "values as read",
    "log2p1": "log2(x + 1), for raw expression counts (x >= 0)",
    "methylation": "drop probes missing in more than --max-missing of the patients; the "
    "remaining missing values stay NaN (missing)",
    "copy-number": "log10(CN / 2 + 1) of absolute copy numbers CN >= 0; missing values are "
    "set to CN = 2 (the normal diploid copy number) first",
}

#: Rule name -> how one sample per patient is kept.
DUPLICATE_RULES = {
    "first": "keep the first sample in preference order: lowest TCGA sample type code "
    "(01 primary tumour first, normal tissue 10-19 after tumour types), then lowest vial "
    "letter, then leftmost position in the file",
    "mean": "average the patient's samples of its preferred sample type (lowest code), "
    "NaN ignored; values are averaged as read, before the recipe",
    "error": "fail on any patient with several samples",
}

# Sample barcode: TCGA-<site>-<participant>-<sample type, 2 digits><vial letter>...
_TCGA_SAMPLE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-(\d{2})([A-Z]?)", re.IGNORECASE)
_UNKNOWN_TYPE = 100
# Heuristic: raw RNA-seq counts of a whole matrix exceed this; log2-scaled values do not.
_LOG_SCALE_MAX = 30.0


@dataclass
class OmicsMatrix:
    """A ``(samples, features)`` float32 matrix with its ids.

    Attributes:
        values: ``(samples, features)`` values, NaN for missing.
        samples: Sample ids (row order).
        features: Feature ids (column order).
        source: File or description, for messages.
    """

    values: np.ndarray
    samples: pd.Index
    features: pd.Index
    source: str

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, source: str, orientation: Orientation) -> OmicsMatrix:
        """Check a numeric DataFrame and orient it as samples by features.

        Raises:
            InputError: Empty, non-numeric or infinite values, duplicated ids.
        """
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        rows = pd.Index(frame.index.astype(str).str.strip()).rename(None)
        columns = pd.Index(pd.Index(frame.columns).astype(str).str.strip()).rename(None)
        if frame.shape[0] == 0 or frame.shape[1] == 0:
            raise InputError(
                f"{source}: empty matrix ({frame.shape[0]} rows x {frame.shape[1]} value "
                "columns); expected ids in the first column and one column per sample"
            )
        non_numeric = [c for c, t in zip(frame.columns, frame.dtypes) if not pd.api.types.is_numeric_dtype(t)]
        if non_numeric:
            _raise_non_numeric(source, frame[non_numeric], orientation)
        values = frame.to_numpy(dtype=np.float32)
        feature_ids, sample_ids = (rows, columns) if orientation == "features-by-samples" else (columns, rows)
        if orientation == "features-by-samples":
            values = np.ascontiguousarray(values.T)
        matrix = cls(values, sample_ids, feature_ids, source)
        matrix.check(orientation)
        return matrix

    def check(self, orientation: Orientation) -> None:
        """Raise InputError on duplicated ids or infinite values."""
        for kind, ids in (("feature", self.features), ("sample", self.samples)):
            if ids.has_duplicates:
                repeated = ids[ids.duplicated()].unique()
                raise InputError(
                    f"{self.source}: {len(repeated)} duplicated {kind} id(s), for example "
                    f"{list(repeated[:3])}; make the {kind} ids unique (for example drop or merge "
                    "the repeated rows) and convert again"
                )
        infinite = np.isinf(self.values)
        if infinite.any():
            row, col = np.argwhere(infinite)[0]
            raise InputError(
                f"{self.source}: infinite value for sample {self.samples[row]!r}, feature "
                f"{self.features[col]!r} ({int(infinite.sum())} in total); replace them with NA "
                "(missing) or finite values"
            )

    def take(self, rows: np.ndarray | None = None, columns: np.ndarray | None = None) -> OmicsMatrix:
        """Return the matrix restricted to ``rows`` and ``columns`` (index arrays)."""
        values, samples, features = self.values, self.samples, self.features
        if rows is not None:
            values, samples = values[rows], samples[rows]
        if columns is not None:
            values, features = values[:, columns], features[columns]
        return OmicsMatrix(values, samples, features, self.source)


@dataclass
class OmicsOptions:
    """Conversion options of one modality.

    Attributes:
        recipe: Key of :data:`RECIPES`.
        top_variable: Keep this many most variable features; None keeps all.
        max_missing: ``methylation`` recipe: drop probes missing in more than this
            fraction of the patients.
        duplicates: Key of :data:`DUPLICATE_RULES`.
        sample_types: Keep only TCGA samples of these two-digit type codes (ids
            without a sample type are kept); None keeps all.
    """

    recipe: str = "none"
    top_variable: int | None = None
    max_missing: float = 0.1
    duplicates: str = "first"
    sample_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise InputError(f"unknown recipe {self.recipe!r}; choose one of {list(RECIPES)}")
        if self.duplicates not in DUPLICATE_RULES:
            raise InputError(
                f"unknown duplicate rule {self.duplicates!r}; choose one of {list(DUPLICATE_RULES)}"
            )
        if self.top_variable is not None and self.top_variable < 1:
            raise InputError(f"--top-variable must be at least 1, got {self.top_variable}")
        if not 0.0 <= self.max_missing <= 1.0:
            raise InputError(f"--max-missing must be a fraction in [0, 1], got {self.max_missing}")
        if self.sample_types is not None:
            bad = [t for t in self.sample_types if not re.fullmatch(r"\d{2}", t)]
            if bad:
                raise InputError(
                    f"invalid sample type code(s) {bad}; use two digits such as 01 (primary "
                    "tumour) or 11 (solid tissue normal)"
                )


@dataclass
class AnnotationColumns:
    """Column names of an annotation table; None picks the first known name present.

    Attributes:
        id: Feature id column (default: the first column).
        chrom: Chromosome column (default: ``chrom``, ``chromosome``, ``chr`` or ``seqname``).
        start: Start position column (default: ``chromStart``, ``start``,
            ``chrom_start`` or ``start_position``).
        symbol: Gene symbol column, copied to ``var["symbol"]`` (default: ``gene``,
            ``symbol``, ``gene_name`` or ``gene_symbol`` when present).
    """

    id: str | None = None
    chrom: str | None = None
    start: str | None = None
    symbol: str | None = None


_CHROM_NAMES = ("chrom", "chromosome", "chr", "seqname")
_START_NAMES = ("chromStart", "start", "chrom_start", "start_position")
_SYMBOL_NAMES = ("gene", "symbol", "gene_name", "gene_symbol")


@dataclass
class _Report:
    """Parameters and counts recorded in ``uns["preprocessing"]``."""

    steps: list[str] = field(default_factory=list)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, name: str, params: dict[str, Any], step: bool = True) -> None:
        if step:
            self.steps.append(name)
        self.entries[name] = params


# --- reading ------------------------------------------------------------------------


def _separator(path: Path) -> str:
    name = path.name.lower()
    return "," if name.endswith((".csv", ".csv.gz")) else "\t"


def _raise_non_numeric(source: str, frame: pd.DataFrame, orientation: Orientation) -> None:
    """Raise InputError naming the first non-numeric cell of ``frame``."""
    for column in frame.columns:
        text = frame[column]
        numbers = pd.to_numeric(text, errors="coerce")
        bad = numbers.isna() & text.notna()
        if bad.any():
            row = bad.to_numpy().nonzero()[0][0]
            row_id, value = frame.index[row], text.iloc[row]
            feature, sample = (row_id, column) if orientation == "features-by-samples" else (column, row_id)
            raise InputError(
                f"{source}: non-numeric value {value!r} for feature {str(feature)!r}, sample "
                f"{str(sample)!r} ({int(bad.sum())} in that column); the matrix must hold numbers, "
                "with NA or an empty cell for a missing value"
            )
    raise InputError(f"{source}: the matrix contains non-numeric values; it must contain numbers only")


def read_omics_matrix(path: str | os.PathLike[str], orientation: Orientation) -> OmicsMatrix:
    """Read a delimited matrix: tab-separated unless the name ends in ``.csv``/``.csv.gz``.

    The first row names the columns and the first column contains row ids. Cells such
    as ``NA``, ``NaN`` and empty ones are missing values (pandas' default NA strings).

    Raises:
        InputError: The file is missing, unreadable, empty, ragged, non-numeric or
            has duplicated ids.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"omics matrix not found: {path.resolve()}; check --src")
    sep = _separator(path)
    try:
        header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file; expected a header row and one row per feature") from None
    except (OSError, UnicodeDecodeError, EOFError, pd.errors.ParserError) as error:
        raise InputError(f"{path}: cannot read it as a delimited text matrix ({error})") from error
    names = [str(n).strip() for n in header.iloc[0]]
    if len(names) < 2:
        raise InputError(
            f"{path}: the header has a single column; expected ids in the first column and "
            f"one column per {'sample' if orientation == 'features-by-samples' else 'feature'}, "
            f"separated by {'commas' if sep == ',' else 'tabs'}"
        )
    dtypes: dict[int, Any] = {i: np.float32 for i in range(1, len(names))}
    dtypes[0] = str
    options = dict(sep=sep, header=None, skiprows=1, index_col=0)
    try:
        frame = pd.read_csv(path, dtype=dtypes, **options)
    except pd.errors.EmptyDataError:
        raise InputError(
            f"{path}: empty matrix (0 rows x {len(names) - 1} value columns); expected one row "
            f"per {'feature' if orientation == 'features-by-samples' else 'sample'} below the header"
        ) from None
    except ValueError as error:
        if isinstance(error, pd.errors.ParserError):
            raise InputError(
                f"{path}: malformed matrix ({error}); every row needs {len(names)} cells"
            ) from error
        # A cell is not a number: read it again as text to name the cell.
        frame = pd.read_csv(path, dtype=str, **options)
        frame.columns = names[1:]
        _raise_non_numeric(str(path), frame, orientation)
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise InputError(f"{path}: cannot read it as a delimited text matrix ({error})") from error
    frame.columns = names[1:]
    if frame.index.isna().any():
        row = int(np.flatnonzero(frame.index.isna())[0])
        raise InputError(
            f"{path}: missing id in the first column of data row {row + 1}; fill or drop the row"
        )
    return OmicsMatrix.from_frame(frame, str(path), orientation)


def read_cohort_patients(path: str | os.PathLike[str], patient_column: str) -> list[str]:
    """Read the patient ids of a cohort table (TCGA barcodes reduced to the patient)."""
    table = read_table(path)
    if patient_column not in table.columns:
        raise InputError(
            f"{path}: no column {patient_column!r} (columns: {list(table.columns)}); pass "
            "--patient-column with the name of the patient id column"
        )
    ids = table[patient_column].dropna().astype(str).str.strip()
    patients = list(dict.fromkeys(normalize_patient_id(i) for i in ids if i))
    if not patients:
        raise InputError(f"{path}: the column {patient_column!r} contains no patient ids")
    return patients


def read_annotation(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read an annotation table (tab-separated unless ``.csv``/``.parquet``) as text."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"annotation table not found: {path.resolve()}; check --annotation")
    if path.name.lower().endswith((".csv", ".csv.gz", ".parquet", ".pq")):
        return read_table(path)
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, UnicodeDecodeError, EOFError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise InputError(f"{path}: cannot read it as a tab-separated table ({error})") from error


# --- samples ------------------------------------------------------------------------


def sample_preference(sample_id: str, position: int) -> tuple[int, str, int]:
    """Sort key of a sample for the ``first`` rule: (type code, vial letter, position).

    Ids without a TCGA sample type sort after all typed samples.
    """
    match = _TCGA_SAMPLE.match(sample_id.strip())
    if match is None:
        return _UNKNOWN_TYPE, "", position
    return int(match.group(1)), match.group(2).upper(), position


def _examples(items: Collection[str], limit: int = 3) -> str:
    first = list(items)[:limit]
    return ", ".join(first) + (", ..." if len(items) > limit else "")


def select_samples(
    matrix: OmicsMatrix,
    modality: str,
    options: OmicsOptions,
    cohort_patients: Collection[str] | None = None,
) -> tuple[OmicsMatrix, list[str], dict[str, Any]]:
    """Keep one row per patient, named by patient id.

    Sample types outside ``options.sample_types`` are dropped first, then samples of
    patients outside the cohort (when given), then duplicates are resolved by
    ``options.duplicates``.

    Returns:
        The matrix with patient ids as rows, the sample id(s) behind each row and the
        report recorded in ``uns["preprocessing"]["samples"]``.

    Raises:
        InputError: No sample matches the cohort or the sample types, or a patient has
            several samples under the ``error`` rule.
    """
    source = matrix.source
    samples = [str(s) for s in matrix.samples]
    patients = [normalize_patient_id(s) for s in samples]
    keep = np.ones(len(samples), dtype=bool)
    report: dict[str, Any] = {
        "rule": options.duplicates,
        "rule_description": DUPLICATE_RULES[options.duplicates],
        "samples_in_file": len(samples),
        "patients_in_file": len(set(patients)),
    }

    if options.sample_types is not None:
        requested_types = set(options.sample_types)
        types = [_TCGA_SAMPLE.match(s) for s in samples]
        dropped_types = np.array([m is not None and m.group(1) not in requested_types for m in types])
        keep &= ~dropped_types
        report["sample_types"] = list(options.sample_types)
        report["samples_dropped_by_type"] = int(dropped_types.sum())
        log.info(
            "%s: %d of %d samples dropped because their type is not in %s",
            modality, int(dropped_types.sum()), len(samples), ",".join(options.sample_types),
        )
        if not keep.any():
            raise InputError(
                f"{source}: no sample has a type in {list(options.sample_types)}; check "
                "--sample-types against the sample barcodes (for example "
                f"{_examples(samples)})"
            )

    if cohort_patients is not None:
        cohort = set(cohort_patients)
        in_cohort = np.array([p in cohort for p in patients])
        if not (in_cohort & keep).any():
            raise InputError(
                f"{source}: none of the {int(keep.sum())} samples belongs to a cohort patient "
                f"(samples such as {_examples([s for s, k in zip(samples, keep) if k])}; cohort "
                f"patients such as {_examples(sorted(cohort))}). Check that the matrix and the "
                "cohort table are of the same project, and --patient-column and --orientation"
            )
        unmatched = [s for s, k, c in zip(samples, keep, in_cohort) if k and not c]
        unmatched_patients = {normalize_patient_id(s) for s in unmatched}
        keep &= in_cohort
        present = {p for p, k in zip(patients, keep) if k}
        missing = [p for p in cohort_patients if p not in present]
        report.update(
            samples_matched=int(keep.sum()),
            patients_matched=len(present),
            samples_unmatched=len(unmatched),
            unmatched_examples=sorted(unmatched)[:10],
            cohort_patients=len(cohort),
            cohort_patients_without_sample=len(missing),
        )
        log.info(
            "%s: %d samples of %d patients match the cohort; %d samples of %d other patients "
            "are not in the cohort and are dropped%s; %d of %d cohort patients have no sample",
            modality, int(keep.sum()), len(present), len(unmatched), len(unmatched_patients),
            f" (e.g. {_examples(sorted(unmatched))})" if unmatched else "",
            len(missing), len(cohort),
        )

    rows_by_patient: dict[str, list[int]] = {}
    for i in np.flatnonzero(keep):
        rows_by_patient.setdefault(patients[i], []).append(int(i))
    duplicated = {p: rows for p, rows in rows_by_patient.items() if len(rows) > 1}
    if duplicated and options.duplicates == "error":
        patient, rows = next(iter(duplicated.items()))
        raise InputError(
            f"{source}: {len(duplicated)} patient(s) have several samples, for example {patient} "
            f"({', '.join(samples[i] for i in rows)}); pass --duplicates first or mean to keep one "
            "row per patient"
        )

    chosen: list[list[int]] = []
    for rows in rows_by_patient.values():
        ranked = sorted(rows, key=lambda i: sample_preference(samples[i], i))
        if options.duplicates == "mean":
            best_type = sample_preference(samples[ranked[0]], 0)[0]
            ranked = [i for i in ranked if sample_preference(samples[i], 0)[0] == best_type]
        else:
            ranked = ranked[:1]
        chosen.append(ranked)

    values = np.empty((len(chosen), matrix.values.shape[1]), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN features of a patient stay NaN
        for row, rows in enumerate(chosen):
            if len(rows) == 1:
                values[row] = matrix.values[rows[0]]
            else:
                values[row] = np.nanmean(matrix.values[rows], axis=0)
    kept_ids = [";".join(samples[i] for i in rows) for rows in chosen]
    out = OmicsMatrix(values, pd.Index(list(rows_by_patient)), matrix.features, source)

    kept_for = dict(zip(rows_by_patient, kept_ids))
    report.update(
        patients=len(chosen),
        duplicated_patients=sorted(duplicated),
        duplicated_kept=[kept_for[p] for p in sorted(duplicated)],
        duplicated_samples=[";".join(samples[i] for i in duplicated[p]) for p in sorted(duplicated)],
    )
    if duplicated:
        example = sorted(duplicated)[0]
        log.info(
            "%s: %d patient(s) have several samples; rule %r kept one row each (e.g. %s: %s of %s)",
            modality, len(duplicated), options.duplicates, example, kept_for[example],
            ", ".join(samples[i] for i in duplicated[example]),
        )
    log.info("%s: %d patients kept from %d samples", modality, len(chosen), len(samples))
    return out, kept_ids, report


# --- recipes and feature selection --------------------------------------------------


def _first_cell(matrix: OmicsMatrix, mask: np.ndarray) -> str:
    row, col = np.argwhere(mask)[0]
    return f"patient {matrix.samples[row]!r}, feature {matrix.features[col]!r}"


def apply_recipe(
    matrix: OmicsMatrix, options: OmicsOptions, modality: str
) -> tuple[OmicsMatrix, dict[str, Any] | None]:
    """Apply ``options.recipe``; return the new matrix and the step's parameters.

    The parameters are None for the recipe ``none``.

    Raises:
        InputError: Negative values for ``log2p1`` or ``copy-number``, or no probe left
            by ``methylation``.
    """
    recipe = options.recipe
    values = matrix.values
    source = matrix.source
    if recipe == "none":
        return matrix, None

    if recipe == "log2p1":
        negative = values < 0
        if negative.any():
            raise InputError(
                f"{source}: recipe log2p1 expects raw counts >= 0 but found {values[negative].min():g} "
                f"({_first_cell(matrix, negative)}); the values may be log-transformed already, so "
                "convert without --recipe log2p1"
            )
        finite = values[np.isfinite(values)]
        if finite.size and finite.max() <= _LOG_SCALE_MAX:
            # NOTE: a heuristic; small count matrices can also stay below this bound.
            log.warning(
                "%s: the largest value is %g; raw counts are usually larger, so the values may "
                "be log-scaled already and log2p1 would apply the log twice",
                modality, float(finite.max()),
            )
        new = np.log2(values + 1.0).astype(np.float32)
        params = {"formula": "log2(x + 1)", "description": RECIPES[recipe]}
        return OmicsMatrix(new, matrix.samples, matrix.features, source), params

    if recipe == "methylation":
        n_patients = values.shape[0]
        missing_fraction = np.isnan(values).mean(axis=0)
        keep = missing_fraction <= options.max_missing
        dropped = matrix.features[~keep]
        if not keep.any():
            raise InputError(
                f"{source}: every probe is missing in more than {options.max_missing:.0%} of the "
                f"{n_patients} patients; raise --max-missing or check the matrix"
            )
        outside = np.isfinite(values) & ((values < 0) | (values > 1))
        if outside.any():
            log.warning(
                "%s: %d values lie outside [0, 1] (%s); beta values lie in [0, 1], so the file may "
                "hold M-values", modality, int(outside.sum()), _first_cell(matrix, outside),
            )
        out = matrix.take(columns=np.flatnonzero(keep))
        params = {
            "description": RECIPES[recipe],
            "max_missing_fraction": float(options.max_missing),
            "probes_in": int(values.shape[1]),
            "probes_dropped": int((~keep).sum()),
            "dropped_examples": [str(p) for p in dropped[:10]],
            "missing_fraction_after": float(np.isnan(out.values).mean()),
        }
        log.info(
            "%s: %d of %d probes dropped (missing in more than %.0f%% of %d patients); %.2f%% of the "
            "remaining values are missing and stay NaN",
            modality, params["probes_dropped"], values.shape[1], 100 * options.max_missing,
            n_patients, 100 * params["missing_fraction_after"],
        )
        return out, params

    # copy-number
    negative = values < 0
    if negative.any():
        raise InputError(
            f"{source}: recipe copy-number expects absolute copy numbers >= 0 but found "
            f"{values[negative].min():g} ({_first_cell(matrix, negative)}); the file may hold log2 "
            "ratios or thresholded calls (-2 to 2), which this recipe does not take"
        )
    missing = np.isnan(values)
    filled = np.where(missing, 2.0, values)
    new = np.log10(filled / 2.0 + 1.0).astype(np.float32)
    params = {
        "formula": "log10(CN / 2 + 1)",
        "description": RECIPES[recipe],
        "missing_value": 2.0,
        "missing_values_filled": int(missing.sum()),
    }
    log.info("%s: %d missing copy numbers set to 2 before log10(CN / 2 + 1)", modality, int(missing.sum()))
    return OmicsMatrix(new, matrix.samples, matrix.features, source), params


def select_top_variable(matrix: OmicsMatrix, n: int, modality: str) -> tuple[OmicsMatrix, dict[str, Any]]:
    """Keep the ``n`` features of largest variance, in their original order.

    The variance is the sample variance (ddof=1) over the patients where the feature is
    measured (NaN ignored), computed on all patients of the matrix, so validation and
    test patients of a later split take part in the selection. The selection uses no
    labels. Features measured in fewer than 2 patients rank last; ties keep the earlier
    feature.
    """
    values = matrix.values
    measured = np.isfinite(values).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        variance = np.nanvar(values, axis=0, ddof=1)
    variance = np.where(measured >= 2, variance, -np.inf)
    n_features = values.shape[1]
    if n >= n_features:
        log.warning("%s: --top-variable %d keeps all %d features", modality, n, n_features)
    order = np.lexsort((np.arange(n_features), -variance))
    kept_columns = np.sort(order[: min(n, n_features)])
    out = matrix.take(columns=kept_columns)
    kept_variance = variance[kept_columns]
    params = {
        "rule": "largest sample variance (ddof=1) over the patients where the feature is "
        "measured, NaN ignored; ties keep the earlier feature; kept features stay in file order",
        "computed_on": f"all {values.shape[0]} patients of the output, before any "
        "train/validation/test split",
        "requested": int(n),
        "features_in": int(n_features),
        "features_kept": int(len(kept_columns)),
        "min_variance_kept": float(kept_variance.min()) if len(kept_columns) else float("nan"),
    }
    log.info(
        "%s: kept the %d most variable of %d features (variance >= %g, computed on all %d patients)",
        modality, len(kept_columns), n_features, params["min_variance_kept"], values.shape[0],
    )
    return out, params


# --- annotation ---------------------------------------------------------------------


def _pick(table: pd.DataFrame, requested: str | None, candidates: tuple[str, ...], what: str,
          source: str, required: bool) -> str | None:
    if requested is not None:
        if requested not in table.columns:
            raise InputError(
                f"{source}: no {what} column {requested!r} (columns: {list(table.columns)}); "
                "fix the --annotation-*-column option"
            )
        return requested
    lower = {str(c).lower(): c for c in table.columns}
    for name in candidates:
        if name.lower() in lower:
            return lower[name.lower()]
    if required:
        raise InputError(
            f"{source}: no {what} column found (looked for {list(candidates)}; columns: "
            f"{list(table.columns)}); name it with --annotation-{what}-column"
        )
    return None


def annotate(
    var: pd.DataFrame, table: pd.DataFrame, columns: AnnotationColumns, source: str, modality: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add ``chrom``, ``start`` (and ``symbol``) columns to ``var`` from an annotation table.

    Features absent from the table get NaN; ids listed twice in the table keep their
    first row.
    """
    if table.empty:
        raise InputError(f"{source}: the annotation table has no rows")
    id_column = columns.id if columns.id is not None else table.columns[0]
    if id_column not in table.columns:
        raise InputError(f"{source}: no id column {id_column!r} (columns: {list(table.columns)})")
    chrom = _pick(table, columns.chrom, _CHROM_NAMES, "chrom", source, required=True)
    start = _pick(table, columns.start, _START_NAMES, "start", source, required=True)
    symbol = _pick(table, columns.symbol, _SYMBOL_NAMES, "symbol", source, required=False)

    ids = table[id_column].astype(str).str.strip()
    repeated = int(ids.duplicated().sum())
    table = table.assign(**{id_column: ids}).drop_duplicates(id_column).set_index(id_column)
    rows = table.reindex(var.index)
    found = rows[chrom].notna().to_numpy()
    var = var.copy()
    var["chrom"] = pd.Categorical(rows[chrom].to_numpy())
    var["start"] = pd.to_numeric(rows[start], errors="coerce").astype(np.float64).to_numpy()
    if symbol is not None and "symbol" not in var.columns:
        var["symbol"] = pd.Categorical(rows[symbol].to_numpy())
    params = {
        "source": source,
        "id_column": str(id_column),
        "chrom_column": str(chrom),
        "start_column": str(start),
        "symbol_column": "" if symbol is None else str(symbol),
        "features_annotated": int(found.sum()),
        "features_without_annotation": int((~found).sum()),
        "repeated_ids_in_table": repeated,
    }
    level = logging.WARNING if (~found).any() else logging.INFO
    log.log(
        level,
        "%s: %d of %d features have genome coordinates from %s%s",
        modality, int(found.sum()), len(found), source,
        f" ({int((~found).sum())} without, e.g. {_examples([str(v) for v in var.index[~found]])}; "
        "genomic groupings leave them out)" if (~found).any() else "",
    )
    return var, params


# --- the conversion -----------------------------------------------------------------


def convert_omics_matrix(
    matrix: OmicsMatrix,
    modality: str,
    options: OmicsOptions | None = None,
    *,
    var: pd.DataFrame | None = None,
    cohort_patients: Collection[str] | None = None,
    annotation: pd.DataFrame | None = None,
    annotation_columns: AnnotationColumns | None = None,
    annotation_source: str = "annotation",
    uns: Mapping[str, Any] | None = None,
) -> ad.AnnData:
    """Turn a samples-by-features matrix into a patients-by-features AnnData.

    Args:
        matrix: The values with sample and feature ids.
        modality: Modality name, for messages and ``uns``.
        options: Recipe, feature selection and duplicate rule.
        var: Feature annotations indexed like ``matrix.features``.
        cohort_patients: Keep only these patients (and fail if none matches).
        annotation: Annotation table for genome coordinates.
        annotation_columns: Its column names.
        annotation_source: Its file name, for messages and ``uns``.
        uns: Further entries of ``uns["preprocessing"]`` (source description, licence).

    Returns:
        ``obs_names``: patient ids, ``obs["sample_id"]``: the sample(s) behind each row,
        ``var_names``: feature ids, ``X``: float32 values with NaN for missing ones.
    """
    options = options or OmicsOptions()
    if var is not None and not var.index.astype(str).equals(matrix.features):
        raise ValueError("var must be indexed by the matrix's feature ids, in the same order")
    report = _Report()

    matrix, sample_ids, samples_report = select_samples(matrix, modality, options, cohort_patients)
    report.add("samples", samples_report, step=False)

    matrix, params = apply_recipe(matrix, options, modality)
    if params is not None:
        report.add(options.recipe, params)
    if options.top_variable is not None:
        matrix, params = select_top_variable(matrix, options.top_variable, modality)
        report.add("top_variable", params)

    var = pd.DataFrame(index=matrix.features) if var is None else var.loc[matrix.features].copy()
    if annotation is not None:
        columns = annotation_columns or AnnotationColumns()
        var, params = annotate(var, annotation, columns, annotation_source, modality)
        report.add("annotation", params, step=False)

    adata = ad.AnnData(
        X=matrix.values.astype(np.float32, copy=False),
        obs=pd.DataFrame({"sample_id": sample_ids}, index=pd.Index(matrix.samples, dtype=str)),
        var=var,
    )
    adata.uns["preprocessing"] = {
        "modality": modality,
        "source": matrix.source,
        **dict(uns or {}),
        "recipe": options.recipe,
        "steps": report.steps,
        **report.entries,
    }
    return adata


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike[str]) -> Path:
    """Write ``adata`` to a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass a file name ending in .h5ad as --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".h5ad", dir=path.parent)
    os.close(handle)
    try:
        adata.write_h5ad(temporary)
        # mkstemp creates the file readable by its owner only; apply the usual umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def convert_omics_file(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    modality: str,
    options: OmicsOptions | None = None,
    *,
    orientation: Orientation = "features-by-samples",
    cohort: str | os.PathLike[str] | None = None,
    patient_column: str = "patient_id",
    annotation: str | os.PathLike[str] | None = None,
    annotation_columns: AnnotationColumns | None = None,
) -> ad.AnnData:
    """Read an omics matrix file, convert it (:func:`convert_omics_matrix`) and write ``out``.

    Everything is read and checked before ``out`` is written, so a failed run leaves
    no output file and an earlier one in place.
    """
    options = options or OmicsOptions()
    cohort_patients = read_cohort_patients(cohort, patient_column) if cohort is not None else None
    annotation_table = read_annotation(annotation) if annotation is not None else None
    matrix = read_omics_matrix(src, orientation)
    log.info(
        "%s: read %d samples x %d features from %s", modality, len(matrix.samples), len(matrix.features), src
    )
    adata = convert_omics_matrix(
        matrix,
        modality,
        options,
        cohort_patients=cohort_patients,
        annotation=annotation_table,
        annotation_columns=annotation_columns,
        annotation_source=str(annotation) if annotation is not None else "annotation",
        uns={"orientation": orientation},
    )
    write_h5ad_atomic(adata, out)
    log.info("%s: wrote %d patients x %d features to %s", modality, adata.n_obs, adata.n_vars, out)
    return adata
