"""Tests of cohort tables and TCGA id handling."""

from __future__ import annotations

import pandas as pd
import pytest

from data_modules.cohort import load_cohort, normalize_patient_id, read_table
from morpheus_pl.errors import InputError


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("TCGA-CS-4938", "TCGA-CS-4938"),
        ("TCGA-CS-4938-01A", "TCGA-CS-4938"),
        ("tcga-cs-4938-01a-11r-1896-07", "TCGA-CS-4938"),
        ("TCGA-CS-4938-01Z-00-DX1.6B2C3E1B-2A6B-4A1E-9B5C-1D8A2B5F3C6D", "TCGA-CS-4938"),
        ("TCGA-CS-4938.01", "TCGA-CS-4938"),
        (" patient_7 ", "patient_7"),
        ("TCGA-CS", "TCGA-CS"),
    ],
)
def test_normalize_patient_id(raw, expected):
    assert normalize_patient_id(raw) == expected


def test_multiple_slides_per_patient(tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame(
        {"patient_id": ["TCGA-AA-0001-01A", "TCGA-AA-0001", "TCGA-AA-0002"], "slide_id": ["s1", "s2", "s3"], "y": [1, 1, 0]}
    ).to_csv(path, index=False)
    cohort = load_cohort(path)
    assert cohort.patients == ["TCGA-AA-0001", "TCGA-AA-0002"]
    assert cohort.slides["TCGA-AA-0001"] == ["s1", "s2"]
    assert cohort.table.loc["TCGA-AA-0002", "y"] == "0"


@pytest.mark.parametrize("suffix", [".tsv", ".parquet"])
def test_other_formats(tmp_path, suffix):
    frame = pd.DataFrame({"patient_id": ["a", "b"], "slide_id": ["s1", "s2"]})
    path = tmp_path / f"c{suffix}"
    if suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    else:
        frame.to_parquet(path)
    assert load_cohort(path).patients == ["a", "b"]


def test_unknown_format(tmp_path):
    path = tmp_path / "c.xlsx"
    path.write_text("x")
    with pytest.raises(InputError, match="unknown table format '.xlsx'"):
        read_table(path)


def test_duplicated_patient_without_slides(tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame({"patient_id": ["TCGA-AA-0001", "TCGA-AA-0001-01A"]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="duplicated patient id 'TCGA-AA-0001'"):
        load_cohort(path, slide_column=None)


def test_duplicated_slide(tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame({"patient_id": ["a", "b"], "slide_id": ["s1", "s1"]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="duplicated slide id 's1'"):
        load_cohort(path)


def test_missing_column_lists_available(tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame({"case": ["a"], "slide_id": ["s1"]}).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"missing column\(s\) \['patient_id'\]; the table has \['case', 'slide_id'\]"):
        load_cohort(path)


def test_patient_straddling_splits(tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame({"patient_id": ["a", "a"], "slide_id": ["s1", "s2"], "split": ["train", "val"]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="patient 'a' has rows with different 'split' values"):
        load_cohort(path, constant_columns=["split"])

