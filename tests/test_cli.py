"""End-to-end tests through the real command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_config
from morpheus_pl import MaskedOmicsPretraining


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "morpheus_pl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("fit", "validate", "test", "predict"):
        assert command in result.stdout


def test_print_config_resolves_demo_config():
    result = run_cli("fit", "--config", "experiments/demo/pretrain.yaml", "--print_config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["class_path"] == "morpheus_pl.MaskedOmicsPretraining"
    assert config["model"]["init_args"]["mask_ratio"] == 0.75
    assert config["data"]["init_args"]["modalities"]["rna"]["grouping"]["class_path"] == "data_modules.GeneSets"
    assert config["checkpoint"]["save_last"] is True


def test_print_config_reference_defaults():
    result = run_cli("fit", "--config", "experiments/pretrain.yaml", "--print_config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    model = config["model"]["init_args"]
    assert (model["lr"], model["weight_decay"], model["warmup_epochs"]) == (5e-4, 1e-3, 10)
    assert config["trainer"]["max_epochs"] == 300
    assert config["data"]["init_args"]["n_patches"] == 1024
    assert config["data"]["init_args"]["batch_size"] == 128
    assert config["seed_everything"] == 1999


def test_unknown_config_key_is_rejected(tiny_cohort, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_cohort, tmp_path / "runs")
    config = yaml.safe_load(path.read_text())
    config["data"]["init_args"]["n_pacthes"] = 8
    path.write_text(yaml.safe_dump(config))
    result = run_cli("fit", "--config", str(path))
    assert result.returncode != 0
    assert "n_pacthes" in result.stderr
    assert "is not accepted" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_fit_end_to_end(tiny_cohort, tmp_path):
    runs = tmp_path / "runs"
    path = write_config(tmp_path / "c.yaml", tiny_cohort, runs, max_epochs=2)
    result = run_cli("fit", "--config", str(path))
    assert result.returncode == 0, result.stderr[-3000:]

    version = runs / "tiny" / "version_0"
    last = version / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert (version / "config.yaml").is_file()
    assert list(version.glob("events.out.tfevents.*"))

    # The checkpoint reloads outside the CLI with the data-derived sizes.
    model = MaskedOmicsPretraining.load_from_checkpoint(last, map_location="cpu")
    assert model.hparams.patch_dim == 16
    assert list(model.hparams.modalities) == ["rna", "dnam"]
    assert len(model.hparams.modalities["dnam"]["groups"]) == 5
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1
    data_state = checkpoint["MorpheusDataModule"]
    assert len(data_state["patients"]["val"]) == 10
    assert data_state["modalities"]["dnam"]["groups"] == model.hparams.modalities["dnam"]["groups"]

    # Every logged curve is present.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version)).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss_epoch", "val/loss", "val/loss_rna", "val/baseline_loss_dnam", "val/pearson_rna"):
        assert tag in tags

    # validate runs from the saved checkpoint, on the split saved in it even when the
    # config's split seed changes; test needs a test split.
    scores = []
    for seed in (None, "5"):
        extra = [] if seed is None else [f"--data.init_args.split.init_args.seed={seed}"]
        result = run_cli("validate", "--config", str(path), "--ckpt_path", str(last), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        scores.append(validation_loss(result.stdout))
    assert scores[0] == scores[1]
    result = run_cli("test", "--config", str(path), "--ckpt_path", str(last))
    assert result.returncode == 2
    assert "the test split of" in result.stderr


def validation_loss(stdout: str) -> float:
    for line in stdout.splitlines():
        fields = line.split()
        if fields[:1] == ["val/loss"]:
            return float(fields[1])
    raise AssertionError(f"no val/loss in the output:\n{stdout}")


def test_unknown_command_lists_all_commands():
    result = run_cli("fewshots")
    assert result.returncode == 2
    assert "unknown command 'fewshots'" in result.stderr
    for command in ("cv", "fewshot", "sweep", "report", "convert-slides", "fit", "predict"):
        assert command in result.stderr
