"""End-to-end tests of predict (reconstruction files, embeddings) and of the report."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import run_cli, write_config


@pytest.fixture(scope="module")
def predicted(tiny_cohort, pretrained_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    config = write_config(root / "c.yaml", tiny_cohort, root / "runs")
    out = root / "pred"
    result = run_cli(
        "predict", "--config", str(config), "--ckpt_path", str(pretrained_checkpoint),
        "--prediction.inputs=[slide, dnam]", "--prediction.token_outputs=true",
        f"--prediction.output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, config


def test_files_round_trip_with_ids_and_features(predicted, tiny_cohort, pretrained_checkpoint):
    from morpheus_pl import MaskedOmicsPretraining

    out, _ = predicted
    rna = ad.read_h5ad(out / "rna.h5ad")
    cohort = pd.read_csv(tiny_cohort.cohort).drop_duplicates("patient_id")
    assert list(rna.obs_names) == list(cohort["patient_id"])
    hparams = MaskedOmicsPretraining.load_from_checkpoint(pretrained_checkpoint, map_location="cpu").hparams
    assert list(rna.var_names) == hparams.modalities["rna"]["features"]
    assert rna.X.shape == (40, 36)
    assert np.isfinite(rna.X).all()
    assert rna.uns["morpheus"]["target"] == "rna"
    assert list(rna.uns["morpheus"]["inputs"]) == ["slide", "dnam"]
    assert not (out / "dnam.h5ad").exists()  # an input is never a target


def test_measured_layer_in_file_units(predicted, tiny_cohort):
    out, _ = predicted
    rna = ad.read_h5ad(out / "rna.h5ad")
    source = ad.read_h5ad(tiny_cohort.omics["rna"])
    source.obs_names = [name[:12] for name in source.obs_names]
    expected = source[rna.obs_names, rna.var_names].X
    np.testing.assert_allclose(rna.layers["measured"], expected, rtol=1e-4, atol=1e-4)
    assert rna.obs["measured"].all()


def test_patient_without_input_is_marked(predicted, tiny_cohort):
    out, _ = predicted
    rna = ad.read_h5ad(out / "rna.h5ad")
    with_dnam = {name[:12] for name in ad.read_h5ad(tiny_cohort.omics["dnam"]).obs_names}
    for patient, used in rna.obs["inputs_used"].items():
        assert used == ("slide+dnam" if patient in with_dnam else "slide")


def test_embeddings_file(predicted):
    out, _ = predicted
    embeddings = ad.read_h5ad(out / "embeddings.h5ad")
    assert embeddings.obsm["X_morpheus"].shape == (40, 16)
    assert embeddings.obsm["slide_tokens"].shape == (40, 4, 16)
    assert embeddings.obsm["dnam_tokens"].shape == (40, 5, 16)
    assert set(embeddings.obs["split"]) == {"train", "val"}


def test_target_without_decoder(predicted, pretrained_checkpoint, tmp_path):
    _, config = predicted
    result = run_cli(
        "predict", "--config", str(config), "--ckpt_path", str(pretrained_checkpoint),
        "--prediction.targets=[cnv]", f"--prediction.output_dir={tmp_path}",
    )
    assert result.returncode == 2
    assert "no decoder for target modalities ['cnv']" in result.stderr
    assert not list(tmp_path.iterdir())


def test_inputs_without_slide(predicted, pretrained_checkpoint, tmp_path):
    _, config = predicted
    result = run_cli(
        "predict", "--config", str(config), "--ckpt_path", str(pretrained_checkpoint),
        "--prediction.inputs=[rna]", f"--prediction.output_dir={tmp_path}",
    )
    assert result.returncode == 2
    assert "do not include the slide" in result.stderr


def test_features_differ_from_checkpoint(own_cohort, pretrained_checkpoint, tmp_path):
    adata = ad.read_h5ad(own_cohort.omics["rna"])
    adata[:, [n for n in adata.var_names if n != "RNA7"]].copy().write_h5ad(own_cohort.omics["rna"])
    config = write_config(tmp_path / "c.yaml", own_cohort, tmp_path / "runs")
    result = run_cli("predict", "--config", str(config), "--ckpt_path", str(pretrained_checkpoint))
    assert result.returncode == 2
    assert "lacks 1 of the 36 features of the checkpoint (for example ['RNA7'])" in result.stderr


def test_report_rows_and_figures(predicted, pretrained_checkpoint, tmp_path):
    _, config = predicted
    out = tmp_path / "report"
    result = run_cli("report", "--config", str(config), "--ckpt_path", str(pretrained_checkpoint), "--split", "val", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out / "report.csv")
    assert list(zip(table["target"], table["inputs"])) == [
        ("rna", "slide"),
        ("rna", "slide + dnam"),
        ("dnam", "slide"),
        ("dnam", "slide + rna"),
    ]
    assert table.loc[table["inputs"] == "slide", "baseline_pearson_median"].isna().all()
    assert table.loc[table["inputs"] != "slide", "baseline_pearson_median"].notna().all()
    assert table["pearson_median"].notna().all()
    for name in ("report.md", "r_distribution_rna.png", "best_worst_dnam.png"):
        assert (out / name).is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_report_empty_split(predicted, pretrained_checkpoint, tmp_path):
    _, config = predicted
    result = run_cli("report", "--config", str(config), "--ckpt_path", str(pretrained_checkpoint), "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "the test split is empty; choose another with --split" in result.stderr
