"""Invalid inputs fail with one clear error that names the culprit and the fix."""

from __future__ import annotations

import subprocess
import sys

import logging
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from conftest import run_cli, write_config
from data_modules import (
    Chunks,
    ClassTargets,
    ColumnSplit,
    FewShot,
    GeneSets,
    KFold,
    MorpheusDataModule,
    OmicsModality,
    RandomSplit,
    SurvivalTargets,
)
from data_modules.converters.omics import convert_omics_file
from data_modules.converters.slides import convert_slides
from data_modules.feature_store import PatchFeatureStore
from data_modules.synthetic import write_synthetic_cohort
from morpheus_pl import SurvivalTask
from morpheus_pl import batch as keys
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


def error_of(call) -> str:
    """Run ``call``, which must raise InputError, and return the message."""
    with pytest.raises(InputError) as caught:
        call()
    return str(caught.value)


def edit_cohort(cohort, edit) -> None:
    """Apply ``edit`` to the cohort table (a DataFrame) and write it back."""
    table = pd.read_csv(cohort.cohort)
    edit(table)
    table.to_csv(cohort.cohort, index=False)


# --- unknown and duplicated ids ---------------------------------------------------------


def test_cohort_patient_missing_from_store(own_cohort):
    def one_row_per_patient(table):
        table.drop_duplicates("patient_id", inplace=True)
        table.drop(columns="slide_id", inplace=True)
        table.iloc[0, table.columns.get_loc("patient_id")] = "TCGA-ZZ-9999"

    edit_cohort(own_cohort, one_row_per_patient)
    message = error_of(lambda: datamodule(own_cohort, slide_column=None).setup())
    assert str(own_cohort.cohort) in message
    assert "'TCGA-ZZ-9999'" in message
    assert f"have no slide in {own_cohort.store}" in message
    assert "set missing_slides: drop" in message


def test_slide_of_other_patient(own_cohort):
    def move_first_slide(table):
        table.loc[0, "patient_id"] = "TCGA-AA-0005"

    edit_cohort(own_cohort, move_first_slide)
    message = error_of(lambda: datamodule(own_cohort).setup())
    assert "slide 'TCGA-AA-0000-01Z-00-DX1' belongs to patient 'TCGA-AA-0000'" in message
    assert f"to 'TCGA-AA-0005' in {own_cohort.cohort}" in message
    assert "fix the cohort table or the store" in message


def test_duplicated_slide_in_cohort(own_cohort):
    def repeat_first_row(table):
        table.loc[len(table)] = table.iloc[0]

    edit_cohort(own_cohort, repeat_first_row)
    message = error_of(lambda: datamodule(own_cohort).setup())
    assert str(own_cohort.cohort) in message
    assert "duplicated slide id 'TCGA-AA-0000-01Z-00-DX1'" in message
    assert "remove the repeated rows" in message


def test_patient_rows_disagree_on_label(own_cohort):
    table = pd.read_csv(own_cohort.cohort)
    patient = table.loc[table["patient_id"].duplicated(), "patient_id"].iloc[0]

    def relabel_one_slide(table):
        table.loc[table.index[table["patient_id"] == patient][0], "subtype"] = "other"

    edit_cohort(own_cohort, relabel_one_slide)
    message = error_of(lambda: datamodule(own_cohort, targets=ClassTargets("subtype")).setup())
    assert str(own_cohort.cohort) in message
    assert f"patient '{patient}' has rows with different 'subtype' values" in message
    assert "must agree on it" in message


def write_slide_file(path: Path, features: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle["features"] = features
        handle.attrs["encoder"] = "toy"


def test_two_files_for_one_slide_id(tmp_path):
    rng = np.random.default_rng(1)
    for folder in ("batch1", "batch2"):
        write_slide_file(tmp_path / "src" / folder / "TCGA-AB-0001-01Z-00-DX1.h5", rng.normal(size=(4, 3)))
    out = tmp_path / "out.zarr"
    message = error_of(lambda: convert_slides(tmp_path / "src", out, pattern="**/*.h5", progress=False))
    assert "slide id 'TCGA-AB-0001-01Z-00-DX1' comes from several files" in message
    assert "batch1/TCGA-AB-0001-01Z-00-DX1.h5" in message
    assert "keep one" in message
    assert not out.exists()


def test_slide_already_in_store(tmp_path):
    store = PatchFeatureStore(tmp_path / "s.zarr", mode="w", feature_dim=3, encoder="toy")
    store.write_slide("slide1", np.ones((4, 3)), patient_id="P1")
    message = error_of(lambda: store.write_slide("slide1", np.zeros((5, 3)), patient_id="P2"))
    assert "slide 'slide1' already exists" in message
    assert "overwrite=True" in message
    assert store.slide_attrs("slide1")["patient_id"] == "P1"
    assert store.read_rows("slide1", 0, 5).tolist() == np.ones((4, 3)).tolist()


# --- labels ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "column"),
    [
        (SurvivalTargets(time_column="os_time", event_column="os_event"), "os_time"),
        (SurvivalTargets(event_column="os_evnt"), "os_evnt"),
        (SurvivalTargets(censorship_column="censored"), "censored"),
        (ClassTargets("subtyp"), "subtyp"),
    ],
)
def test_missing_label_column(tiny_cohort, targets, column):
    message = error_of(lambda: datamodule(tiny_cohort, targets=targets).setup())
    assert str(tiny_cohort.cohort) in message
    assert f"missing column(s) ['{column}']" in message
    assert "'os_months', 'os_event', 'subtype'" in message  # the columns the table has
    assert "Set the column names in the config" in message


@pytest.mark.parametrize("split", [RandomSplit(0.25), FewShot(k=2)], ids=["random", "fewshot"])
def test_single_class_cohort(own_cohort, split):
    def one_class(table):
        table["subtype"] = "alpha"

    edit_cohort(own_cohort, one_class)
    dm = datamodule(own_cohort, targets=ClassTargets("subtype"), split=split)
    message = error_of(dm.setup)
    assert str(own_cohort.cohort) in message
    assert "column 'subtype' has 1 class(es) ['alpha'] among its 40 labelled patient(s)" in message
    assert "classification needs at least two" in message
    assert "check that the column and the cohort table are the intended ones" in message


def test_single_class_training_split(own_cohort):
    # Training patients are all of class alpha; the others validate.
    def train_on_alpha(table):
        table["split"] = np.where(table["subtype"] == "alpha", "train", "val")

    edit_cohort(own_cohort, train_on_alpha)
    dm = datamodule(own_cohort, targets=ClassTargets("subtype"), split=ColumnSplit("split"))
    message = error_of(dm.setup)
    assert str(own_cohort.cohort) in message
    assert "the training split contains only class(es) ['alpha']" in message
    assert "classes ['alpha', 'beta', 'gamma']" in message
    assert "put patients of other classes in the training split" in message


def test_single_class_validation_accepted(own_cohort):
    # A validation split of one class is accepted, because its metrics report NaN with a
    # warning instead of a misleading number.
    def hold_out_beta(table):
        table["split"] = np.where(table["subtype"] == "beta", "val", "train")

    edit_cohort(own_cohort, hold_out_beta)
    dm = datamodule(own_cohort, targets=ClassTargets("subtype"), split=ColumnSplit("split"))
    dm.setup()
    beta = dm.target_info["classes"].index("beta")
    held_out = dm.data.targets.tensors[keys.LABEL][dm.data.indices("val")]
    assert held_out.unique().tolist() == [beta]
    assert dm.target_info["train_counts"][beta] == 0


def test_infinite_survival_time(own_cohort):
    def set_time(table):
        table.loc[table["patient_id"] == "TCGA-AA-0003", "os_months"] = np.inf

    edit_cohort(own_cohort, set_time)
    targets = SurvivalTargets(event_column="os_event")
    message = error_of(lambda: datamodule(own_cohort, targets=targets, split=KFold(4)).setup())
    assert str(own_cohort.cohort) in message
    assert "patient 'TCGA-AA-0003' has 'os_months' = inf" in message
    assert "survival times must be finite" in message
    assert "leave the cell empty to drop the patient" in message


@pytest.mark.parametrize("value", [np.nan, -3.0], ids=["missing", "negative"])
def test_unusable_survival_time_drops_patient(own_cohort, caplog, value):
    def set_time(table):
        table.loc[table["patient_id"] == "TCGA-AA-0003", "os_months"] = value

    edit_cohort(own_cohort, set_time)
    dm = datamodule(own_cohort, targets=SurvivalTargets(event_column="os_event"), split=KFold(4))
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "TCGA-AA-0003" not in dm.data.patients
    assert "1 of 40 patient(s) have no usable label" in caplog.text
    assert "(first: TCGA-AA-0003)" in caplog.text


# --- NaN in omics ---------------------------------------------------------------------


def test_all_nan_omics_row_means_absent(own_cohort, caplog):
    adata = ad.read_h5ad(own_cohort.omics["rna"])
    empty, partial = adata.obs_names[0], adata.obs_names[1]
    adata.X[0, :] = np.nan
    adata.X[1, :5] = np.nan
    adata.write_h5ad(own_cohort.omics["rna"])
    dm = datamodule(own_cohort)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    rna = dm.data.modalities["rna"]
    assert not rna.present[dm.data.patients.index(empty[:12])]
    assert rna.present[dm.data.patients.index(partial[:12])]  # NaN values only mark missing values
    assert f"1 patient(s) have no measured value in {own_cohort.omics['rna']}" in caplog.text
    assert f"(first: {empty[:12]})" in caplog.text


def test_omics_file_of_only_nan(own_cohort):
    adata = ad.read_h5ad(own_cohort.omics["dnam"])
    adata.X[:] = np.nan
    adata.write_h5ad(own_cohort.omics["dnam"])
    message = error_of(lambda: datamodule(own_cohort).setup())
    assert f"{own_cohort.omics['dnam']} (modality 'dnam')" in message
    assert "has a measured value among the grouped features (all NaN)" in message
    assert "check the file" in message


# --- converters -----------------------------------------------------------------------


def test_nan_slide_stops_conversion_resumably(tmp_path):
    rng = np.random.default_rng(2)
    src, out = tmp_path / "src", tmp_path / "out.zarr"
    bad = rng.normal(size=(6, 3))
    bad[2, 1] = np.nan
    write_slide_file(src / "TCGA-AB-0001-01Z-00-DX1.h5", rng.normal(size=(5, 3)))
    write_slide_file(src / "TCGA-AB-0002-01Z-00-DX1.h5", bad)
    write_slide_file(src / "TCGA-AB-0003-01Z-00-DX1.h5", rng.normal(size=(5, 3)))

    message = error_of(lambda: convert_slides(src, out, progress=False))
    assert "slide 'TCGA-AB-0002-01Z-00-DX1' (TCGA-AB-0002-01Z-00-DX1.h5)" in message
    assert "NaN or infinite features in 1 of 6 patches" in message
    assert "re-extract the features" in message
    assert "Nothing of that slide was written" in message
    assert f"The 1 of 3 slide(s) written before it are complete in {out}" in message
    assert "running the command again skips them" in message
    store = PatchFeatureStore(out)
    assert [s.slide_id for s in store.slides()] == ["TCGA-AB-0001-01Z-00-DX1"]
    assert list(store.root["slides"].group_keys()) == ["TCGA-AB-0001-01Z-00-DX1"]

    write_slide_file(src / "TCGA-AB-0002-01Z-00-DX1.h5", np.nan_to_num(bad))
    summary = convert_slides(src, out, progress=False)
    assert (summary.already_converted, summary.converted) == (1, 2)


def test_infinite_omics_matrix_keeps_previous_output(tmp_path):
    samples = ["TCGA-AA-0001-01A", "TCGA-AA-0002-01A"]
    matrix = pd.DataFrame([[1.0, 2.0], [3.0, 4.0]], index=["GENE1", "GENE2"], columns=samples)
    src, out = tmp_path / "rna.tsv", tmp_path / "rna.h5ad"
    matrix.rename_axis("gene").to_csv(src, sep="\t")
    convert_omics_file(src, out, "rna")
    before = out.read_bytes()

    matrix.loc["GENE2", "TCGA-AA-0002-01A"] = np.inf
    matrix.rename_axis("gene").to_csv(src, sep="\t")
    message = error_of(lambda: convert_omics_file(src, out, "rna"))
    assert str(src) in message
    assert "infinite value for sample 'TCGA-AA-0002-01A', feature 'GENE2'" in message
    assert "replace them with NA (missing) or finite values" in message
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rna.h5ad", "rna.tsv"]


# --- checkpoints whose data differ -------------------------------------------------------


def test_pretrained_with_other_features(own_cohort, pretrained_checkpoint):
    adata = ad.read_h5ad(own_cohort.omics["rna"])
    adata.var_names = ["RNA3_v2" if name == "RNA3" else name for name in adata.var_names]
    adata.write_h5ad(own_cohort.omics["rna"])
    dm = datamodule(own_cohort, targets=SurvivalTargets(event_column="os_event"), split=KFold(4))
    small = dict(width=16, num_prototypes=4, heads=2, mlp_dim=16)

    def build_task():
        SurvivalTask(
            patch_dim=dm.feature_dim,
            modalities=dm.modality_specs,
            target_info=dm.target_info,
            pretrained=str(pretrained_checkpoint),
            **small,
        )

    message = error_of(build_task)
    assert f"{pretrained_checkpoint}: the features of modality 'rna' differ from the data's" in message
    assert "36 in the checkpoint, 35 in the data, first difference at position 3" in message
    assert "use the same omics files, preprocessing and grouping as in pre-training" in message


def test_restore_with_other_modalities(tiny_cohort, pretrained_checkpoint):
    modalities = {"rna": OmicsModality(str(tiny_cohort.omics["rna"]), GeneSets(str(tiny_cohort.gmt)))}
    dm = datamodule(tiny_cohort, modalities=modalities, restore_from=str(pretrained_checkpoint))
    message = error_of(dm.setup)
    assert f"the checkpoint {pretrained_checkpoint} was trained with modalities ['dnam', 'rna']" in message
    assert "the config has ['rna']" in message
    assert "configure the same modalities in data.modalities" in message


def test_validate_with_store_of_other_dimension(pretrained_checkpoint, tmp_path):
    other = write_synthetic_cohort(tmp_path / "wide", n_patients=40, patch_dim=12, missing={"dnam": 0.2})
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.yaml", other, runs)
    checkpoint = str(pretrained_checkpoint)
    result = run_cli("validate", "--config", str(config), "--ckpt_path", checkpoint, timeout=300)
    assert result.returncode == 2
    assert f"the checkpoint {pretrained_checkpoint} was trained on 16-d patch features" in result.stderr
    assert f"the store {other.store} contains 12-d features" in result.stderr
    assert "use the store the checkpoint was trained with" in result.stderr
    assert "Traceback" not in result.stderr
    assert not runs.exists()


# --- configuration ----------------------------------------------------------------------


def test_unknown_model_key_exits_2(tiny_cohort, tmp_path):
    runs = tmp_path / "runs"
    path = write_config(tmp_path / "c.yaml", tiny_cohort, runs)
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"]["widht"] = 8
    path.write_text(yaml.safe_dump(config))
    result = run_cli("fit", "--config", str(path), timeout=300)
    assert result.returncode == 2
    assert "Option 'widht' is not accepted" in result.stderr
    assert "morpheus_pl.MaskedOmicsPretraining" in result.stderr
    assert "python -m morpheus_pl fit --help" in result.stderr
    assert "Traceback" not in result.stderr
    assert not runs.exists()
