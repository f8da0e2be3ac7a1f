"""End-to-end tests of the protocol commands and of a task defined in YAML alone."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from conftest import run_cli, write_task_config

SURVIVAL = {"class_path": "data_modules.SurvivalTargets", "init_args": {"event_column": "os_event", "n_bins": 3}}
SUBTYPE = {"class_path": "data_modules.ClassTargets", "init_args": {"label_column": "subtype"}}


def test_cv_table(tiny_cohort, tmp_path):
    config = write_task_config(
        tmp_path / "cv.yaml",
        tiny_cohort,
        tmp_path / "runs",
        {"class_path": "morpheus_pl.SurvivalTask"},
        SURVIVAL,
        {"class_path": "data_modules.KFold", "init_args": {"n_folds": 3, "seed": 2}},
    )
    out = tmp_path / "cv"
    result = run_cli("cv", "--config", str(config), "--out", str(out), "--folds", "2", "--keep-checkpoints")
    assert result.returncode == 0, result.stderr[-3000:]

    table = pd.read_csv(out / "results.csv")
    assert table["fold"].astype(str).tolist() == ["0", "1", "mean", "std", "n"]
    assert "test/c_index" in table.columns
    per_fold = table["test/c_index"][:2].astype(float)
    assert table["test/c_index"][2] == pytest.approx(per_fold.mean(), rel=1e-12)
    markdown = (out / "results.md").read_text()
    assert "| fold | test/loss | test/c_index |" in markdown
    assert "git revision" in markdown
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["class_path"] == "morpheus_pl.SurvivalTask"
    assert json.loads((out / "run.json").read_text())["command"].startswith("python")
    assert (out / "fold1" / "checkpoints" / "last.ckpt").is_file()
    assert [p.name for p in (out / "fold1" / "checkpoints").iterdir()] == ["last.ckpt"]


def test_fewshot_table(tiny_cohort, tmp_path):
    config = write_task_config(
        tmp_path / "fs.yaml",
        tiny_cohort,
        tmp_path / "runs",
        {"class_path": "morpheus_pl.ClassificationTask"},
        SUBTYPE,
        {"class_path": "data_modules.FewShot", "init_args": {"k": 2}},
    )
    out = tmp_path / "fs"
    result = run_cli("fewshot", "--config", str(config), "--out", str(out), "--samplings", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out / "results.csv")
    assert table["sampling"].astype(str).tolist() == ["0", "1", "mean", "std", "n"]
    assert not list(out.glob("*/checkpoints/*.ckpt"))
    assert {"test/auroc", "test/balanced_accuracy"} <= set(table.columns)


def test_sweep_one_row_per_combination(tiny_cohort, tmp_path):
    config = write_task_config(
        tmp_path / "sw.yaml",
        tiny_cohort,
        tmp_path / "runs",
        {"class_path": "morpheus_pl.SurvivalTask"},
        SURVIVAL,
        {"class_path": "data_modules.RandomSplit", "init_args": {"val_fraction": 0.25, "test_fraction": 0.25}},
    )
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"model.init_args.loss": ["logistic_hazard", "cox"], "model.init_args.lr": [0.001, 0.0001]}))
    out = tmp_path / "sweep"
    result = run_cli("sweep", "--config", str(config), "--grid", str(grid), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out / "results.csv")
    runs = table[~table["model.init_args.loss"].isin(["mean", "std", "n"])]
    assert len(runs) == 4
    summary = table[table["model.init_args.loss"].isin(["mean", "std", "n"])]
    assert summary["model.init_args.lr"].isna().all()
    assert set(runs["model.init_args.loss"]) == {"logistic_hazard", "cox"}


def test_single_class_fold_gives_nan(own_cohort, tmp_path):
    # Validation and test patients all of one class: AUROC is NaN, the fit completes.
    table = pd.read_csv(own_cohort.cohort)
    first = table.drop_duplicates("patient_id")
    alpha = first.loc[first["subtype"] == "alpha", "patient_id"]
    held_out = set(alpha[:4])
    table["split"] = ["val" if p in held_out else "train" for p in table["patient_id"]]
    table.to_csv(own_cohort.cohort, index=False)
    config = write_task_config(
        tmp_path / "c.yaml",
        own_cohort,
        tmp_path / "runs",
        {"class_path": "morpheus_pl.ClassificationTask"},
        SUBTYPE,
        {"class_path": "data_modules.ColumnSplit", "init_args": {"column": "split"}},
    )
    result = run_cli("validate", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "single class" in result.stderr
    values = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if line.strip().startswith("val/")}
    assert math.isnan(float(values["val/auroc"]))


def test_regression_task_from_yaml_alone(tiny_cohort, tmp_path):
    config = write_task_config(
        tmp_path / "reg.yaml",
        tiny_cohort,
        tmp_path / "runs",
        {"class_path": "morpheus_pl.tasks.regression.RegressionTask", "init_args": {"lr": 0.003}},
        {"class_path": "morpheus_pl.tasks.regression.RegressionTargets", "init_args": {"column": "os_months"}},
        {"class_path": "data_modules.RandomSplit", "init_args": {"val_fraction": 0.25}},
        max_epochs=2,
    )
    result = run_cli("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    last = tmp_path / "runs" / "task" / "version_0" / "checkpoints" / "last.ckpt"
    from morpheus_pl.tasks.regression import RegressionTask

    model = RegressionTask.load_from_checkpoint(last, map_location="cpu")
    assert model.hparams.target_info["task"] == "regression"
    assert model.head.out_features == 1


def test_fine_tuning_config_takes_pretraining_groups(tiny_cohort, pretrained_checkpoint, tmp_path):
    # The config asks for 6 DNAm chunks; the pre-trained tokenizers expect 5.
    config = write_task_config(
        tmp_path / "ft.yaml",
        tiny_cohort,
        tmp_path / "runs",
        {"class_path": "morpheus_pl.SurvivalTask", "init_args": {"pretrained": str(pretrained_checkpoint)}},
        SURVIVAL,
        {"class_path": "data_modules.KFold", "init_args": {"n_folds": 3}},
    )
    text = config.read_text().replace("n_groups: 5", "n_groups: 6")
    config.write_text(text)
    result = run_cli("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialised from" in result.stderr
    assert "loaded" in result.stderr
