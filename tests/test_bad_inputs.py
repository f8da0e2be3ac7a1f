"""Invalid inputs fail with one clear error that names the culprit and the fix."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr

from conftest import write_config
from data_modules import Chunks, ColumnSplit, GeneSets, MorpheusDataModule, OmicsModality, RandomSplit
from data_modules.feature_store import PatchFeatureStore
from morpheus_pl.errors import InputError


def datamodule(cohort, **kwargs) -> MorpheusDataModule:
    options = dict(
        modalities={
            "rna": OmicsModality(str(cohort.omics["rna"]), GeneSets(str(cohort.gmt))),
            "dnam": OmicsModality(str(cohort.omics["dnam"]), Chunks(5)),
        },
        n_patches=8,
        batch_size=4,
        num_workers=0,
        split=RandomSplit(0.25),
    )
    options.update(kwargs)
    return MorpheusDataModule(str(cohort.cohort), str(cohort.store), **options)


def test_duplicated_patient_in_omics(own_cohort):
    adata = ad.read_h5ad(own_cohort.omics["rna"])
    names = list(adata.obs_names)
    names[1] = names[0].replace("-01A", "-02A")  # a second sample of the same patient
    adata.obs_names = names
    adata.write_h5ad(own_cohort.omics["rna"])
    with pytest.raises(InputError, match=r"rna\.h5ad \(modality 'rna'\): duplicated patient id 'TCGA-AA-0000'.*keep one row per patient"):
        datamodule(own_cohort).setup()


def test_slide_with_zero_patches_in_store(own_cohort):
    group = zarr.open_group(str(own_cohort.store), mode="r+")["slides"]
    first = next(iter(group.group_keys()))
    group[first].attrs["n_patches"] = 0
    with pytest.raises(InputError, match=f"slide '{first}' of patient .* has 0 patches"):
        datamodule(own_cohort).setup()


def test_patch_dim_differs_from_store(tiny_cohort):
    with pytest.raises(InputError, match="contains 16-d patch features .* but patch_dim is 1536"):
        datamodule(tiny_cohort, patch_dim=1536).setup()


def test_non_finite_patches_found_when_read(own_cohort):
    store = PatchFeatureStore(own_cohort.store)
    info = next(store.slides())
    array = zarr.open_group(str(own_cohort.store), mode="r+")[f"slides/{info.slide_id}/features"]
    values = array[:]
    values[:] = np.nan
    array[:] = values
    dm = datamodule(own_cohort, n_patches=None)
    dm.setup()
    index = dm.data.patients.index(info.patient_id)
    split = next(name for name, members in dm.data.splits.items() if index in members)
    bags = dm.dataset(split, train_sampling=False)
    position = bags.patients.index(info.patient_id)
    with pytest.raises(InputError, match=f"patient '{info.patient_id}': NaN or infinite patch features in slide.*{info.slide_id}.*re-extract"):
        bags[position]


def test_infinite_omics_value(own_cohort):
    adata = ad.read_h5ad(own_cohort.omics["dnam"])
    adata.X[2, 3] = np.inf
    adata.write_h5ad(own_cohort.omics["dnam"])
    with pytest.raises(InputError, match=r"infinite value for patient .* feature 'DNAM3'"):
        datamodule(own_cohort).setup()


def test_gmt_matching_no_feature(own_cohort, tmp_path):
    gmt = tmp_path / "other.gmt"
    gmt.write_text("SET\tdesc\tTP53\tEGFR\n")
    modalities = {"rna": OmicsModality(str(own_cohort.omics["rna"]), GeneSets(str(gmt)))}
    with pytest.raises(InputError, match=r"other\.gmt: no gene of its 1 set\(s\) matches a feature of modality 'rna'"):
        datamodule(own_cohort, modalities=modalities).setup()


def test_empty_validation_split(own_cohort):
    table = pd.read_csv(own_cohort.cohort)
    table["split"] = "train"
    table.to_csv(own_cohort.cohort, index=False)
    with pytest.raises(InputError, match="the val split of .* is empty .* split by ColumnSplit"):
        datamodule(own_cohort, split=ColumnSplit("split")).setup()


def test_empty_validation_from_fraction(tiny_cohort):
    with pytest.raises(InputError, match="the val split .* is empty .* split by RandomSplit.*val_fraction"):
        datamodule(tiny_cohort, split=RandomSplit(0.0)).setup()


def test_unknown_slide_in_cohort(own_cohort):
    table = pd.read_csv(own_cohort.cohort)
    table.loc[0, "slide_id"] = "NOT-A-SLIDE"
    table.to_csv(own_cohort.cohort, index=False)
    with pytest.raises(InputError, match="slide 'NOT-A-SLIDE' of patient .* is not in the store .* missing_slides: drop"):
        datamodule(own_cohort).setup()
    dm = datamodule(own_cohort, missing_slides="drop")
    dm.setup()
    assert len(dm.data.patients) in (39, 40)


def test_omics_ids_match_no_patient(own_cohort):
    adata = ad.read_h5ad(own_cohort.omics["dnam"])
    adata.obs_names = [f"X{i}" for i in range(adata.n_obs)]
    adata.write_h5ad(own_cohort.omics["dnam"])
    with pytest.raises(InputError, match=r"dnam\.h5ad \(modality 'dnam'\): none of its .* ids .* matches a cohort patient"):
        datamodule(own_cohort).setup()


def test_missing_omics_file(tiny_cohort, tmp_path):
    modalities = {"rna": OmicsModality(str(tmp_path / "nope.h5ad"), GeneSets(str(tiny_cohort.gmt)))}
    with pytest.raises(InputError, match="omics file of modality 'rna' not found: .*nope.h5ad"):
        datamodule(tiny_cohort, modalities=modalities).setup()


def test_cli_prints_input_error_without_traceback(own_cohort, tmp_path):
    table = pd.read_csv(own_cohort.cohort)
    table["split"] = "train"
    table.to_csv(own_cohort.cohort, index=False)
    runs = tmp_path / "runs"
    config = write_config(
        tmp_path / "c.yaml",
        own_cohort,
        runs,
        split={"class_path": "data_modules.ColumnSplit", "init_args": {"column": "split"}},
    )
    result = subprocess.run(
        [sys.executable, "-m", "morpheus_pl", "fit", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "the val split of" in result.stderr
    assert "Traceback" not in result.stderr
    assert not runs.exists()
